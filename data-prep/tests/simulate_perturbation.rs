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
        "--out", s(&out), "--truth", s(&truth), "--genes", "200", "--perturbed-genes", "8", "--doubles", "6",
        "--synergy-fraction", "1", "--cells-per-condition", "60", "--control-cells", "300", "--targets-per-gene", "10",
        "--synergy-targets", "12", "--cell-type", "RPE1", "--seed", "9",
    ];
    ok(simulate(&args, "2"));
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&truth).unwrap()).unwrap();
    assert!(t["doubles"].as_array().unwrap().iter().all(|d| d["kind"] == "synergy" && d["synergy_targets"].as_array().unwrap().len() == 12));
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
    let small = ["--genes", "120", "--perturbed-genes", "6", "--doubles", "5", "--cells-per-condition", "20", "--control-cells", "100", "--targets-per-gene", "8"];
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
    ] {
        let mut args = vec!["--out", s(&out)];
        args.extend(extra.iter().copied());
        let o = simulate(&args, "1");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(flag) && !err.contains("panicked"), "{extra:?}: {err}");
        assert!(!out.exists(), "no output after an error");
    }
}
