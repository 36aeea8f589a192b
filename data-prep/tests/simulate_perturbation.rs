//! `scgpt-prep simulate-perturbation`: a simulated Perturb-seq screen in the GEARS format with a
//! planted network. The file is read back by anndata and its planted effects recovered from the
//! data by an independent numpy reading (tests/check_perturbation_screen.py); determinism is
//! checked with the workspace's h5ad reader.
//!
//! Python comes from `SCGPT_PYTHON` or `<repo>/.venv/bin/python` (`bash launch/setup.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scgpt_data::h5ad::{H5adReader, MatrixChoice};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SCGPT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(venv.exists(), "these tests read the screen with Python (anndata, numpy): run `bash launch/setup.sh` or set SCGPT_PYTHON");
    venv
}

fn simulate(args: &[&str], threads: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt-prep"))
        .arg("simulate-perturbation")
        .args(args)
        .arg("--quiet")
        .env("RAYON_NUM_THREADS", threads)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .expect("run scgpt-prep")
}

fn ok(o: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "scgpt-prep simulate-perturbation failed:\n{text}");
    text
}

fn check(h5ad: &Path, truth: &Path) -> String {
    let o = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_perturbation_screen.py"))
        .args([h5ad, truth])
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .expect("run python");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && text.contains("OK:"), "independent check failed:\n{text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn default_screen_is_gears_format_and_its_planted_effects_are_recoverable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sub/screen.h5ad");
    let said = ok(simulate(&["--out", s(&out)], "2"));
    assert!(said.contains("2560 cells x 300 genes") && said.contains("15 synergy"), "{said}");
    // The truth lands beside the output by default.
    let truth = tmp.path().join("sub/screen.truth.json");
    assert!(truth.exists(), "default truth path {}", truth.display());
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&truth).unwrap()).unwrap();
    assert_eq!(t["args"]["seed"], 0);
    assert_eq!(t["h5ad"], "screen.h5ad");
    assert_eq!(t["singles"].as_array().unwrap().len(), 24);
    assert_eq!(t["doubles"].as_array().unwrap().len(), 30);
    let report = check(&out, &truth);
    println!("{report}");
}

#[test]
fn other_sizes_all_synergy_and_an_explicit_truth_path() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s.h5ad");
    let truth = tmp.path().join("t/truth.json");
    let args = [
        "--out",
        s(&out),
        "--truth",
        s(&truth),
        "--genes",
        "200",
        "--perturbed-genes",
        "8",
        "--doubles",
        "6",
        "--synergy-fraction",
        "1",
        "--cells-per-condition",
        "60",
        "--control-cells",
        "300",
        "--targets-per-gene",
        "10",
        "--synergy-targets",
        "12",
        "--cell-type",
        "RPE1",
        "--seed",
        "9",
    ];
    ok(simulate(&args, "2"));
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&truth).unwrap()).unwrap();
    assert!(t["doubles"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["kind"] == "synergy" && d["synergy_targets"].as_array().unwrap().len() == 12));
    assert_eq!(t["n_cells"], 300 + 14 * 60);
    println!("{}", check(&out, &truth));
}

/// Every array of the file: X's CSR parts (indptr, indices, data), each obs column, the genes.
type Contents = (Vec<usize>, Vec<u32>, Vec<f32>, Vec<Vec<String>>, Vec<String>);

fn contents(path: &Path) -> Contents {
    let mut r = H5adReader::open(path, MatrixChoice::X).unwrap();
    let b = r.read_rows(0, r.n_obs()).unwrap();
    let obs = ["condition", "cell_type", "dose_val", "control", "condition_name"].iter().map(|c| r.obs_column(c).unwrap()).collect();
    (b.indptr.clone(), b.indices.to_vec(), b.data.to_vec(), obs, r.var_names(Some("gene_name")).unwrap())
}

#[test]
fn same_seed_gives_the_same_screen_whatever_the_thread_count_and_another_seed_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["one", "two", "other"].iter().map(|d| tmp.path().join(d)).collect();
    let small = [
        "--genes",
        "120",
        "--perturbed-genes",
        "6",
        "--doubles",
        "5",
        "--cells-per-condition",
        "20",
        "--control-cells",
        "100",
        "--targets-per-gene",
        "8",
    ];
    for (dir, (seed, threads)) in dirs.iter().zip([("5", "1"), ("5", "2"), ("6", "2")]) {
        let out = dir.join("screen.h5ad");
        let mut args = vec!["--out", s(&out), "--seed", seed];
        args.extend_from_slice(&small);
        ok(simulate(&args, threads));
    }
    let read = |d: &Path| (contents(&d.join("screen.h5ad")), std::fs::read(d.join("screen.truth.json")).unwrap());
    let (a, b, c) = (read(&dirs[0]), read(&dirs[1]), read(&dirs[2]));
    assert!(a.0 .2.iter().zip(&b.0 .2).all(|(x, y)| x.to_bits() == y.to_bits()), "X values are bit-identical");
    assert_eq!(a, b, "1 thread and 2 threads give the same screen and truth");
    assert_eq!(a.0 .4, c.0 .4, "the gene set does not depend on the seed");
    assert_ne!(a.0 .2, c.0 .2, "another seed draws other counts");
    assert_ne!(a.0 .3[0], c.0 .3[0], "another seed plans other conditions or another cell order");
    assert_ne!(a.1, c.1, "another seed plants another network");
}

#[test]
fn impossible_plans_are_errors_that_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.h5ad");
    for (extra, flag) in [
        (vec!["--perturbed-genes", "4", "--doubles", "7"], "--doubles"),
        (vec!["--genes", "40", "--perturbed-genes", "30"], "--perturbed-genes"),
        (vec!["--synergy-fraction", "1.5"], "--synergy-fraction"),
        (vec!["--counts-per-gene", "0"], "--counts-per-gene"),
        (vec!["--min-lfc", "2", "--max-lfc", "1"], "--min-lfc"),
        (vec!["--genes", "40", "--perturbed-genes", "5", "--doubles", "4", "--targets-per-gene", "9"], "--synergy-targets"),
        (vec!["--modules", "1"], "--modules"),
        (vec!["--perturbed-genes", "6", "--modules", "3", "--doubles", "10", "--synergy-fraction", "0.2"], "--synergy-fraction"),
        (
            vec!["--genes", "60", "--perturbed-genes", "12", "--modules", "2", "--doubles", "10", "--targets-per-gene", "12"],
            "--synergy-targets",
        ),
    ] {
        let mut args = vec!["--out", s(&out)];
        args.extend(extra.iter().copied());
        let o = simulate(&args, "1");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(flag) && !err.contains("panicked"), "{extra:?}: {err}");
        assert!(!out.exists(), "no output after an error");
    }
}

/// Mean log-normalised expression of each condition minus the control mean, over every gene.
fn shifts(path: &Path) -> std::collections::HashMap<String, Vec<f64>> {
    let (indptr, indices, data, obs, genes) = contents(path);
    let g = genes.len();
    let mut sum: std::collections::HashMap<String, (Vec<f64>, usize)> = std::collections::HashMap::new();
    for (row, cond) in obs[0].iter().enumerate() {
        let e = sum.entry(cond.clone()).or_insert_with(|| (vec![0.0; g], 0));
        for k in indptr[row]..indptr[row + 1] {
            e.0[indices[k] as usize] += f64::from(data[k]);
        }
        e.1 += 1;
    }
    let mean = |(v, n): &(Vec<f64>, usize)| v.iter().map(|x| x / *n as f64).collect::<Vec<f64>>();
    let ctrl = mean(&sum["ctrl"]);
    sum.iter()
        .filter(|(c, _)| c.as_str() != "ctrl")
        .map(|(c, s)| (c.clone(), mean(s).iter().zip(&ctrl).map(|(x, c)| x - c).collect()))
        .collect()
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

#[test]
fn modules_plant_one_program_per_module_pair_that_every_double_across_it_shares() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.h5ad");
    let args = [
        "--out",
        s(&out),
        "--genes",
        "150",
        "--perturbed-genes",
        "12",
        "--modules",
        "3",
        "--doubles",
        "30",
        "--synergy-fraction",
        "0.6",
        "--targets-per-gene",
        "8",
        "--synergy-targets",
        "12",
        "--seed",
        "4",
    ];
    let said = ok(simulate(&args, "2"));
    assert!(said.contains("30 doubles of which 18 synergy"), "{said}");
    let truth = tmp.path().join("m.truth.json");
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&truth).unwrap()).unwrap();
    assert_eq!(t["args"]["modules"], 3);

    // The modules partition the perturbed genes, 4 each, and each single names its module.
    let modules = t["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 3);
    let mut module_of = std::collections::HashMap::new();
    for (k, m) in modules.iter().enumerate() {
        assert_eq!(m["module"], k);
        assert_eq!(m["genes"].as_array().unwrap().len(), 4, "balanced modules: {m}");
        for gene in m["genes"].as_array().unwrap() {
            assert!(module_of.insert(gene.as_str().unwrap().to_string(), k).is_none(), "{gene} in two modules");
        }
    }
    let singles = t["singles"].as_array().unwrap();
    assert_eq!(module_of.len(), singles.len());
    for s in singles {
        assert_eq!(s["module"].as_u64().unwrap() as usize, module_of[s["gene"].as_str().unwrap()], "{s}");
    }

    // One program per pair of modules, in order, its targets free of both modules' genes and targets.
    let programs = t["programs"].as_array().unwrap();
    let pairs: Vec<[usize; 2]> =
        programs.iter().map(|p| [p["modules"][0].as_u64().unwrap() as usize, p["modules"][1].as_u64().unwrap() as usize]).collect();
    assert_eq!(pairs, vec![[0, 1], [0, 2], [1, 2]]);
    for (p, pair) in programs.iter().zip(&pairs) {
        let targets: Vec<u64> = p["targets"].as_array().unwrap().iter().map(|x| x["index"].as_u64().unwrap()).collect();
        assert_eq!(targets.len(), 12);
        for s in singles.iter().filter(|s| pair.contains(&(s["module"].as_u64().unwrap() as usize))) {
            let touched: Vec<u64> = std::iter::once(s["index"].as_u64().unwrap())
                .chain(s["targets"].as_array().unwrap().iter().map(|x| x["index"].as_u64().unwrap()))
                .collect();
            assert!(targets.iter().all(|x| !touched.contains(x)), "program {pair:?} touches {}'s genes", s["gene"]);
        }
    }

    // A double is synergy exactly when its genes are in two modules; it then carries their
    // program's targets and lfcs; within a module it is additive.
    let doubles = t["doubles"].as_array().unwrap();
    let mut by_program: std::collections::BTreeMap<[usize; 2], Vec<&serde_json::Value>> = Default::default();
    for d in doubles {
        let (a, b) = (module_of[d["genes"][0].as_str().unwrap()], module_of[d["genes"][1].as_str().unwrap()]);
        if a == b {
            assert_eq!(d["kind"], "additive", "{d}");
            assert!(d.get("program").is_none() && d["synergy_targets"].as_array().unwrap().is_empty(), "{d}");
        } else {
            let pair = [a.min(b), a.max(b)];
            assert_eq!(d["kind"], "synergy", "{d}");
            assert_eq!(d["program"], serde_json::json!(pair), "{d}");
            let k = pairs.iter().position(|p| *p == pair).unwrap();
            assert_eq!(d["synergy_targets"], programs[k]["targets"], "{d}");
            by_program.entry(pair).or_default().push(d);
        }
    }

    // In the data: what a synergy double adds to the sum of its singles' shifts, on its program's
    // targets, follows the planted lfcs, and two doubles of the same module pair share it.
    let shift = shifts(&out);
    let single_of: std::collections::HashMap<&str, &str> =
        singles.iter().map(|s| (s["gene"].as_str().unwrap(), s["condition"].as_str().unwrap())).collect();
    let residual = |d: &serde_json::Value, idx: &[usize]| -> Vec<f64> {
        let (sa, sb) = (&shift[single_of[d["genes"][0].as_str().unwrap()]], &shift[single_of[d["genes"][1].as_str().unwrap()]]);
        let sd = &shift[d["condition"].as_str().unwrap()];
        idx.iter().map(|&i| sd[i] - sa[i] - sb[i]).collect()
    };
    let mut compared = 0;
    for (pair, ds) in &by_program {
        let k = pairs.iter().position(|p| p == pair).unwrap();
        let idx: Vec<usize> = programs[k]["targets"].as_array().unwrap().iter().map(|x| x["index"].as_u64().unwrap() as usize).collect();
        let lfc: Vec<f64> = programs[k]["targets"].as_array().unwrap().iter().map(|x| x["lfc"].as_f64().unwrap()).collect();
        let res: Vec<Vec<f64>> = ds.iter().map(|d| residual(d, &idx)).collect();
        for (d, r) in ds.iter().zip(&res) {
            assert!(pearson(r, &lfc) > 0.8, "{}: residual on program {pair:?} vs planted lfc r = {}", d["condition"], pearson(r, &lfc));
        }
        for w in res.windows(2) {
            let r = pearson(&w[0], &w[1]);
            assert!(r > 0.75, "two doubles of modules {pair:?} share the program's shift: r = {r}");
            compared += 1;
        }
        // Another pair's program is not this pair's: on its targets that are not this one's
        // (programs are drawn independently and may share genes) and that neither single of
        // the double touches (a touched gene's log shift is not additive), the double stays
        // near the sum of its singles.
        let other = (k + 1) % programs.len();
        let own: f64 = res.iter().flatten().map(|x| x.abs()).sum::<f64>() / (res.len() * idx.len()) as f64;
        let (mut off, mut n_off) = (0.0, 0usize);
        for d in ds {
            let touched: Vec<usize> = singles
                .iter()
                .filter(|s| d["genes"].as_array().unwrap().contains(&s["gene"]))
                .flat_map(|s| {
                    std::iter::once(s["index"].as_u64().unwrap() as usize)
                        .chain(s["targets"].as_array().unwrap().iter().map(|x| x["index"].as_u64().unwrap() as usize))
                })
                .collect();
            let idx_o: Vec<usize> = programs[other]["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["index"].as_u64().unwrap() as usize)
                .filter(|i| !touched.contains(i) && !idx.contains(i))
                .collect();
            off += residual(d, &idx_o).iter().map(|x| x.abs()).sum::<f64>();
            n_off += idx_o.len();
        }
        let off = off / n_off.max(1) as f64;
        assert!(n_off > 0 && own > 2.0 * off, "modules {pair:?}: |residual| on own program {own} vs another's untouched targets {off}");
    }
    assert!(compared >= 10, "only {compared} pairs of doubles compared");
    println!("{}", check(&out, &truth));

    // Without --modules the truth has none of these keys.
    let plain = tmp.path().join("p.h5ad");
    ok(simulate(
        &[
            "--out",
            s(&plain),
            "--genes",
            "120",
            "--perturbed-genes",
            "6",
            "--doubles",
            "5",
            "--cells-per-condition",
            "5",
            "--control-cells",
            "20",
            "--targets-per-gene",
            "8",
        ],
        "2",
    ));
    let text = std::fs::read_to_string(tmp.path().join("p.truth.json")).unwrap();
    for key in ["\"modules\"", "\"programs\"", "\"module\"", "\"program\""] {
        assert!(!text.contains(key), "{key} in a screen without --modules");
    }
}
