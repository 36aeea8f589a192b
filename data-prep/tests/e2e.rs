//! End-to-end runs of the `scgpt-prep` binary on real and simulated h5ad files, checked by an
//! independent Python reading (anndata + numpy + pyarrow: tests/py/check_shards.py).
//!
//! Python comes from `SCGPT_PYTHON` or `<repo>/.venv/bin/python` (`.ci/run` creates it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scgpt_data::h5ad::{Column, Frame, H5adWriter};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SCGPT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(venv.exists(), "these tests check shards with Python (anndata, pyarrow): run `bash launch/setup.sh` or set SCGPT_PYTHON");
    venv
}

fn prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt-prep"))
        .args(args)
        .arg("--quiet")
        .current_dir(repo())
        .env_remove("SCGPT_PREP_ABORT_AFTER_SHARDS")
        .output()
        .expect("run scgpt-prep")
}

fn ok(out: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scgpt-prep failed:\n{text}");
    text
}

fn err(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "scgpt-prep should have failed:\n{text}");
    assert!(!text.contains("panicked"), "a panic instead of an error:\n{text}");
    text
}

fn check(args: &[&str]) {
    let out =
        Command::new(python()).arg(repo().join("tests/py/check_shards.py")).args(args).current_dir(repo()).output().expect("run python");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("OK:"), "independent check failed:\n{text}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn shard_digests(dir: &Path) -> Vec<(String, String)> {
    manifest(dir)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["file"].as_str().unwrap().to_string(), s["blake3"].as_str().unwrap().to_string()))
        .collect()
}

fn simulate(path: &Path, cells: usize) {
    ok(Command::new(env!("CARGO_BIN_EXE_scgpt-prep"))
        .args(["simulate", "--cells", &cells.to_string(), "--genes", "1500", "--genes-per-cell", "300", "--programs", "5"])
        .args(["--markers", "20", "--seed", "3", "--quiet", "--out", s(path)])
        .output()
        .unwrap());
}

#[test]
fn wu2020_shards_match_an_independent_reading_and_are_deterministic() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for (dir, workers) in [(&a, "2"), (&b, "1")] {
        ok(prep(&[
            "--input",
            "tests/data/wu2020_200.h5ad",
            "--out",
            s(dir),
            "--deterministic",
            "--obs-cols",
            "cluster_orig,patient,source",
            "--set",
            "filter.min_genes_per_cell=300",
            "--workers",
            workers,
        ]));
    }
    check(&["--h5ad", "tests/data/wu2020_200.h5ad", "--shards", s(&a), "--min-genes", "300", "--deterministic"]);
    assert_eq!(shard_digests(&a), shard_digests(&b), "--deterministic output is identical across runs and thread counts");
    let m = manifest(&a);
    assert_eq!(m["vocab"]["tokens"], 60_697);
    assert_eq!(m["sources"][0]["size"], std::fs::metadata(repo().join("tests/data/wu2020_200.h5ad")).unwrap().len());
    assert!(a.join("vocab.json").exists());
}

#[test]
fn seeded_random_ties_are_reproducible_and_seed_dependent() {
    let t = tempfile::tempdir().unwrap();
    let run = |dir: &Path, seed: &str| {
        ok(prep(&["--input", "tests/data/wu2020_200.h5ad", "--out", s(dir), "--seed", seed]));
        shard_digests(dir)
    };
    let a = run(&t.path().join("a"), "1");
    assert_eq!(a, run(&t.path().join("b"), "1"));
    assert_ne!(a, run(&t.path().join("c"), "2"));
    check(&["--h5ad", "tests/data/wu2020_200.h5ad", "--shards", s(&t.path().join("c"))]);
}

#[test]
fn log_normalised_raw_needs_allow_non_integer() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o");
    let e = err(prep(&["--input", "tests/data/pbmc68k_reduced.h5ad", "--out", s(&out)]));
    assert!(e.contains("pbmc68k_reduced.h5ad") && e.contains("not an integer count") && e.contains("--allow-non-integer"), "{e}");
    ok(prep(&["--input", "tests/data/pbmc68k_reduced.h5ad", "--out", s(&out), "--allow-non-integer", "--obs-cols", "bulk_labels,louvain"]));
    check(&["--h5ad", "tests/data/pbmc68k_reduced.h5ad", "--shards", s(&out), "--allow-non-integer"]);
}

#[test]
fn legacy_anndata_encodings_read_with_a_built_vocabulary() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o");
    ok(prep(&[
        "--input",
        "tests/data/legacy_v0.7.0.h5ad",
        "tests/data/legacy_v0.7.8.h5ad",
        "--out",
        s(&out),
        "--build-vocab",
        "--obs-cols",
        "obs_cat",
    ]));
    check(&["--h5ad", "tests/data/legacy_v0.7.0.h5ad", "--h5ad", "tests/data/legacy_v0.7.8.h5ad", "--shards", s(&out)]);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("vocab.json")).unwrap()).unwrap();
    assert_eq!(v["gene0"], 0, "a built vocabulary numbers genes first");
    assert_eq!(v["<pad>"], 40);
}

#[test]
fn extending_a_vocabulary_keeps_old_ids() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.json");
    std::fs::write(&base, r#"{"gene3": 0, "<pad>": 1, "<cls>": 2, "<eoc>": 3}"#).unwrap();
    let out = t.path().join("o");
    ok(prep(&["--input", "tests/data/legacy_v0.7.8.h5ad", "--out", s(&out), "--vocab", s(&base), "--build-vocab"]));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("vocab.json")).unwrap()).unwrap();
    assert_eq!((v["gene3"].as_u64(), v["<pad>"].as_u64(), v["<eoc>"].as_u64()), (Some(0), Some(1), Some(3)));
    assert_eq!(v["gene0"], 4);
    assert_eq!(v.as_object().unwrap().len(), 43);
}

#[test]
fn simulated_cellxgene_file_with_ensembl_ids_and_obs_filters() {
    let t = tempfile::tempdir().unwrap();
    let h5 = t.path().join("sim.h5ad");
    simulate(&h5, 3000);
    // var index = Ensembl ids: bridged to symbols; feature_name gives the same genes.
    let (by_id, by_name) = (t.path().join("id"), t.path().join("name"));
    let filters = ["--set", r#"filter.obs=["disease == \"normal\"", "suspension_type != \"na\""]"#];
    ok(prep(
        &[&["--input", s(&h5), "--out", s(&by_id), "--obs-cols", "cell_type,batch", "--shard-cells", "500"][..], &filters[..]].concat(),
    ));
    ok(prep(
        &[
            &[
                "--input",
                s(&h5),
                "--out",
                s(&by_name),
                "--gene-col",
                "feature_name",
                "--obs-cols",
                "cell_type,batch",
                "--shard-cells",
                "500",
            ][..],
            &filters[..],
        ]
        .concat(),
    ));
    let f = ["--obs-filter", r#"disease == "normal""#, "--obs-filter", r#"suspension_type != "na""#];
    check(&[&["--h5ad", s(&h5), "--shards", s(&by_id)][..], &f[..]].concat());
    check(&[&["--h5ad", s(&h5), "--shards", s(&by_name), "--gene-col", "feature_name"][..], &f[..]].concat());
    let m = manifest(&by_id);
    let total = m["total_cells"].as_u64().unwrap();
    assert!(total > 2000 && total < 3000, "obs filters drop ~15% of cells: {total}");
    assert!(m["shards"].as_array().unwrap().iter().all(|s| s["rows"].as_u64().unwrap() <= 500));
    assert_eq!(m["sources"][0]["stats"]["genes_matched_via_ensembl"], 1500);
}

#[test]
fn a_killed_run_resumes_to_identical_shards() {
    let t = tempfile::tempdir().unwrap();
    let h5 = t.path().join("sim.h5ad");
    simulate(&h5, 2000);
    let full = t.path().join("full");
    let args = |dir: &Path, sync_every: &str| -> Vec<String> {
        let sync = format!("run.sync_every_s={sync_every}");
        ["--input", s(&h5), "--out", s(dir), "--shard-cells", "300", "--seed", "9", "--set", &sync].iter().map(|a| a.to_string()).collect()
    };
    let run = |a: Vec<String>| ok(prep(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    run(args(&full, "30"));
    // Synced after every shard, the rerun resumes after the third; synced every 30 s (the
    // default), nothing was recorded before the kill and the rerun redoes the file, overwriting
    // the unrecorded shards the dead run left.
    for (sync_every, recorded) in [("0", true), ("30", false)] {
        let killed = t.path().join(format!("killed-{sync_every}"));
        let crashed = Command::new(env!("CARGO_BIN_EXE_scgpt-prep"))
            .args(args(&killed, sync_every))
            .arg("--quiet")
            .env("SCGPT_PREP_ABORT_AFTER_SHARDS", "3")
            .output()
            .unwrap();
        assert!(!crashed.status.success(), "the run was killed");
        assert!(!killed.join("manifest.json").exists(), "no manifest before the run finishes");
        let visible: Vec<String> =
            std::fs::read_dir(&killed).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        // Shards being written or finished when the run died are hidden temp files.
        let shards = visible.iter().filter(|n| n.ends_with(".parquet") && !n.starts_with('.')).count();
        assert_eq!(shards, 3, "exactly the finished shards are visible: {visible:?}");
        let record = killed.join(".progress/sim.json");
        assert_eq!(record.exists(), recorded, "progress recorded before the kill (sync every {sync_every} s)");
        if recorded {
            let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
            assert_eq!(rec["shards"].as_array().unwrap().len(), 3, "{rec}");
        }
        let rerun = run(args(&killed, sync_every));
        assert!(rerun.contains("1 file(s) processed"), "{rerun}");
        let left: Vec<String> =
            std::fs::read_dir(&killed).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(left.iter().all(|n| !n.starts_with(".tmp-")), "the rerun removes the dead run's temp files: {left:?}");
        assert_eq!(shard_digests(&full), shard_digests(&killed), "sync every {sync_every} s");
        let again = run(args(&killed, sync_every));
        assert!(again.contains("0 file(s) processed, 1 already done"), "finished files are skipped: {again}");
    }
}

fn write_h5ad(path: &Path, data: &[f32]) {
    let mut w = H5adWriter::create(path, 3).unwrap();
    w.append_rows(&[0, 3], &[0, 1, 2], data).unwrap();
    w.append_rows(&[0, 2], &[0, 2], &[1.0, 2.0]).unwrap();
    let obs = Frame { index: vec!["c0".into(), "c1".into()], columns: vec![] };
    let var = Frame {
        index: vec!["TP53".into(), "EGFR".into(), "MYC".into()],
        columns: vec![("feature_name".into(), Column::Strings(vec!["TP53".into(), "EGFR".into(), "MYC".into()]))],
    };
    w.finish(&obs, &var).unwrap();
}

#[test]
fn bad_inputs_give_errors_naming_file_and_field() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o");
    let o = s(&out);
    let run = |input: &Path, extra: &[&str]| err(prep(&[&["--input", s(input), "--out", o][..], extra].concat()));

    let e = run(&t.path().join("missing.h5ad"), &[]);
    assert!(e.contains("missing.h5ad") && e.contains("not found"), "{e}");

    let text = t.path().join("text.h5ad");
    std::fs::write(&text, "cell,gene\n").unwrap();
    let e = run(&text, &[]);
    assert!(e.contains("text.h5ad") && e.contains("not an HDF5 file"), "{e}");

    let no_x = t.path().join("no_x.h5ad");
    hdf5::File::create(&no_x).unwrap().create_group("obs").unwrap();
    let e = run(&no_x, &[]);
    assert!(e.contains("no_x.h5ad") && e.contains("`X`"), "{e}");

    let neg = t.path().join("negative.h5ad");
    write_h5ad(&neg, &[1.0, -2.0, 3.0]);
    let e = run(&neg, &[]);
    assert!(e.contains("negative.h5ad") && e.contains("negative") && e.contains("EGFR") && e.contains("c0"), "{e}");

    let nan = t.path().join("nan.h5ad");
    write_h5ad(&nan, &[1.0, f32::NAN, 3.0]);
    let e = run(&nan, &[]);
    assert!(e.contains("nan.h5ad") && e.contains("not a finite number"), "{e}");
    assert!(e.contains("row 0 (cell `c0`)") && e.contains("gene `EGFR`"), "the error names the cell and the gene: {e}");

    let good = t.path().join("good.h5ad");
    write_h5ad(&good, &[1.0, 2.0, 3.0]);
    let e = run(&good, &["--gene-col", "gene_symbols"]);
    assert!(e.contains("good.h5ad") && e.contains("gene_symbols") && e.contains("feature_name"), "{e}");
    let e = run(&good, &["--obs-cols", "cell_type"]);
    assert!(e.contains("good.h5ad") && e.contains("obs/cell_type"), "{e}");
    let e = run(&good, &["--set", "filter.min_genes_per_cell=10"]);
    assert!(e.contains("nothing left after filtering"), "{e}");
    let e = run(&good, &["--set", "filter.min_genes=10"]);
    assert!(e.contains("filter.min_genes") && e.contains("--set"), "unknown key named: {e}");
    let cfg = t.path().join("bad.toml");
    std::fs::write(&cfg, "[output]\nshard_cells = \"many\"\n").unwrap();
    let e = err(prep(&["--config", s(&cfg), "--input", s(&good), "--out", o]));
    assert!(e.contains("output.shard_cells") && e.contains("bad.toml"), "{e}");

    let unknown = t.path().join("unknown_genes.h5ad");
    {
        let mut w = H5adWriter::create(&unknown, 2).unwrap();
        w.append_rows(&[0, 2], &[0, 1], &[1.0, 2.0]).unwrap();
        let obs = Frame { index: vec!["c0".into()], columns: vec![] };
        let var = Frame { index: vec!["ENSG99999999991".into(), "ENSG99999999992".into()], columns: vec![] };
        w.finish(&obs, &var).unwrap();
    }
    let e = run(&unknown, &[]);
    assert!(e.contains("unknown_genes.h5ad") && e.contains("Ensembl") && e.contains("--gene-col"), "{e}");

    // skip_bad_files: the good file is sharded, the bad one is reported in the manifest.
    let dir = t.path().join("mixed");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&good, dir.join("good.h5ad")).unwrap();
    std::fs::copy(&neg, dir.join("negative.h5ad")).unwrap();
    let e = err(prep(&["--input", s(&dir), "--out", o]));
    assert!(e.contains("negative.h5ad"), "{e}");
    ok(prep(&["--input", s(&dir), "--out", o, "--set", "input.skip_bad_files=true"]));
    let m = manifest(&out);
    assert_eq!(m["skipped_files"].as_array().unwrap().len(), 1);
    assert_eq!(m["total_cells"], 2);
}

/// 20 cells; with `filter.gene_min_counts_per_10k_cells = 5000` the threshold is 10 counts.
/// GAPDH and ACTB are in every cell; CD3E is stored in 10 cells with 1 each (10: kept at the
/// boundary); EGFR in 3 cells with 5 each (stored in too few cells to settle by counting: its
/// values keep it); MYC in 3 cells with 1 (dropped); TP53 in 4 cells with 2, and, with
/// `zeros`, stored as an explicit 0 in 8 more (12 stored cells, yet a total of 8: dropped).
fn write_gene_filter_case(path: &Path, zeros: bool) {
    let genes = ["TP53", "EGFR", "MYC", "GAPDH", "ACTB", "CD3E"];
    let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
    for cell in 0..20usize {
        let mut put = |g: u32, v: f32| {
            indices.push(g);
            data.push(v);
        };
        if cell < 4 {
            put(0, 2.0);
        } else if zeros && cell < 12 {
            put(0, 0.0);
        }
        if cell % 5 == 0 && cell < 15 {
            put(1, 5.0);
        }
        if (1..4).contains(&cell) {
            put(2, 1.0);
        }
        put(3, 3.0);
        put(4, 1.0 + (cell % 2) as f32);
        if cell < 10 {
            put(5, 1.0);
        }
        indptr.push(indices.len());
    }
    let mut w = H5adWriter::create(path, genes.len()).unwrap();
    w.append_rows(&indptr, &indices, &data).unwrap();
    let obs = Frame { index: (0..20).map(|i| format!("c{i}")).collect(), columns: vec![] };
    let var = Frame { index: genes.iter().map(|g| g.to_string()).collect(), columns: vec![] };
    w.finish(&obs, &var).unwrap();
}

#[test]
fn gene_filter_from_counts_agrees_with_exact_totals() {
    let t = tempfile::tempdir().unwrap();
    let record = |dir: &Path, stem: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!(".progress/{stem}.json"))).unwrap()).unwrap()
    };
    for zeros in [false, true] {
        let stem = if zeros { "zeros" } else { "counts" };
        let h5 = t.path().join(format!("{stem}.h5ad"));
        write_gene_filter_case(&h5, zeros);
        let run = |dir: &Path, extra: &[&str]| {
            ok(prep(
                &[
                    &["--input", s(&h5), "--out", s(dir), "--deterministic", "--set", "filter.gene_min_counts_per_10k_cells=5000"][..],
                    extra,
                ]
                .concat(),
            ))
        };
        let counted = t.path().join(format!("{stem}-counted"));
        let said = run(&counted, &[]);
        check(&["--h5ad", s(&h5), "--shards", s(&counted), "--per10k", "5000", "--deterministic"]);
        let m = manifest(&counted);
        assert_eq!(m["sources"][0]["stats"]["genes_kept"], 4, "GAPDH, ACTB, CD3E and EGFR: {m}");
        // Explicit zeros break "stored in n cells, so at least n counts": the file is checked
        // against exact totals, and TP53's fate differs, so it is binned again.
        assert_eq!(record(&counted, stem)["exact_gene_filter"], zeros, "{said}");
        assert_eq!(said.contains("binning the file again"), zeros, "{said}");
        // Non-integer input always takes the exact filter; integer input gives the same shards.
        let exact = t.path().join(format!("{stem}-exact"));
        run(&exact, &["--allow-non-integer"]);
        assert_eq!(record(&exact, stem)["exact_gene_filter"], true);
        let bytes = |dir: &Path| std::fs::read(dir.join(format!("{stem}.00000.parquet"))).unwrap();
        assert_eq!(bytes(&counted), bytes(&exact), "same shard from counts and from exact totals ({stem})");
    }
}

/// `SCGPT_PORTABLE=1` sends every SIMD kernel down its portable twin; the shards must not
/// change. On a machine without AVX-512 both runs take the portable paths and this checks only
/// the switch; on one with it (or in CI's portable run beside the default one) it compares the
/// AVX-512 kernels (row compaction, small-integer bins and dictionaries, seeded tie draws)
/// against their twins end to end.
#[test]
fn portable_kernels_write_the_same_shards() {
    let t = tempfile::tempdir().unwrap();
    let h5 = t.path().join("sim.h5ad");
    simulate(&h5, 3000);
    let run = |dir: &Path, portable: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_scgpt-prep"))
            .args(["--input", s(&h5), "--out", s(dir), "--shard-cells", "1000", "--seed", "4", "--obs-cols", "cell_type", "--quiet"])
            .env("SCGPT_PORTABLE", portable)
            .env_remove("SCGPT_PREP_ABORT_AFTER_SHARDS")
            .output()
            .unwrap();
        ok(out);
        shard_digests(dir)
    };
    let vector = run(&t.path().join("vector"), "0");
    assert_eq!(vector.len(), 3);
    assert_eq!(vector, run(&t.path().join("portable"), "1"), "{}", scgpt_data::simd::describe());
}
