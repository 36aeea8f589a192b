//! `scgpt eval integration` end to end on `tests/data/eval/scib_small.h5ad` against scib 1.1.7's
//! own `scib.metrics.metrics(...)` and graph LISI on the same file. Both are written by
//! `tests/gen/eval/gen_scib_reference.py` (see there and
//! `crates/scgpt-eval/tests/scib_reference.rs`, which holds the library to the same reference
//! and explains the tolerances).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Silhouettes (float32 distances in scikit-learn) and graph connectivity.
const F32_LEVEL: f64 = 1e-6;
/// PCR: scanpy rounds PC scores to float32.
const PCR_TOL: f64 = 1e-5;
/// Graph LISI: scib reads path lengths back with 6 significant digits.
const LISI_TOL: f64 = 1e-4;
/// NMI / ARI of the NMI-optimal Leiden clustering: another local optimum than leidenalg's.
const LEIDEN_NMI_TOL: f64 = 0.02;
const LEIDEN_ARI_TOL: f64 = 0.05;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn h5ad() -> PathBuf {
    root().join("tests/data/eval/scib_small.h5ad")
}

fn reference() -> Value {
    let p = root().join("tests/data/eval/scib_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn run(extra: &[&str], report: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .args(["eval", "integration", "--input"])
        .arg(h5ad())
        .arg("--report")
        .arg(report)
        .args(extra)
        .output()
        .expect("run scgpt")
}

fn metrics(report: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap()).unwrap()
}

fn close(what: &str, got: &Value, want: f64, tol: f64) {
    let got = got.as_f64().unwrap_or_else(|| panic!("{what}: {got} is not a number"));
    println!("{what}: ours {got:.9} scib {want:.9} |diff| {:.2e}", (got - want).abs());
    assert!((got - want).abs() <= tol, "{what}: {got} vs {want} (tol {tol})");
}

#[test]
fn metrics_match_scib() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["--embedding", "X_emb", "--label-col", "label", "--batch-col", "batch"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Progress with timings.
    assert!(stderr.contains("knn_and_silhouettes:") && stderr.contains("leiden:"), "{stderr}");
    let m = metrics(dir.path());
    let r = reference();
    let want = &r["reference"]["metrics"];
    let f = |k: &str| want[k].as_f64().unwrap();
    close("ASW_label", &m["ASW_label"], f("ASW_label"), F32_LEVEL);
    close("ASW_label/batch", &m["ASW_label/batch"], f("ASW_label/batch"), F32_LEVEL);
    close("graph_conn", &m["graph_conn"], f("graph_conn"), F32_LEVEL);
    close("PCR_batch", &m["PCR_batch"], f("PCR_batch"), PCR_TOL);
    close("NMI_cluster/label", &m["NMI_cluster/label"], f("NMI_cluster/label"), LEIDEN_NMI_TOL);
    close("ARI_cluster/label", &m["ARI_cluster/label"], f("ARI_cluster/label"), LEIDEN_ARI_TOL);
    let lisi = &r["reference"]["lisi"];
    close("iLISI", &m["iLISI"], lisi["iLISI"].as_f64().unwrap(), LISI_TOL);
    close("cLISI", &m["cLISI"], lisi["cLISI"].as_f64().unwrap(), LISI_TOL);
    let avg_bio =
        (m["NMI_cluster/label"].as_f64().unwrap() + m["ARI_cluster/label"].as_f64().unwrap() + m["ASW_label"].as_f64().unwrap()) / 3.0;
    close("avg_bio", &m["avg_bio"], avg_bio, 1e-12);
    let avg_batch = (m["ASW_label/batch"].as_f64().unwrap() + m["graph_conn"].as_f64().unwrap()) / 2.0;
    close("avg_batch", &m["avg_batch"], avg_batch, 1e-12);
    assert!(r["reference"]["optimal_clustering"]["resolutions"].as_array().unwrap().contains(&m["leiden_resolution"]));
    assert_eq!(m["n_cells"], 700);
    assert_eq!(m["leiden"].as_array().unwrap().len(), 10);
    assert!(m["pre_integration"].as_str().unwrap().starts_with("X (60 genes)"), "{}", m["pre_integration"]);
    let notes: Vec<&str> = m["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.contains("`Lone cell`")), "{notes:?}");
    // The UMAP picture (two panels) decodes; no temporary file is left beside the report.
    let png = std::fs::read(dir.path().join("umap.png")).unwrap();
    let info = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap().info().clone();
    assert!(info.width > info.height && info.height >= 300, "two panels side by side: {}x{}", info.width, info.height);
    let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["metrics.json", "umap.png"]);
}

#[test]
fn bad_columns_and_keys_name_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["--embedding", "X_emb", "--label-col", "label", "--batch-col", "sample"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("obs/sample") && err.contains("available obs columns") && err.contains("batch") && err.contains("louvain"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = run(&["--embedding", "X_scGPT", "--label-col", "label", "--batch-col", "batch"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("obsm/X_scGPT") && err.contains("X_emb"), "{err}");
    assert!(!dir.path().join("metrics.json").exists());
}

#[test]
fn one_batch_is_a_warning_and_null_batch_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["--embedding", "X_emb", "--label-col", "label", "--batch-col", "single_batch", "--no-lisi"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("single_batch"), "{err}");
    let m = metrics(dir.path());
    for k in ["ASW_label/batch", "PCR_batch", "iLISI", "cLISI", "avg_batch"] {
        assert!(m[k].is_null(), "{k}: {}", m[k]);
    }
    for k in ["ASW_label", "graph_conn", "NMI_cluster/label", "avg_bio"] {
        assert!(m[k].is_number(), "{k}: {}", m[k]);
    }
    assert!(m["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with("one batch")));
}

#[test]
fn missing_values_are_left_out_and_pre_embedding_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &["--embedding", "X_emb", "--label-col", "label", "--batch-col", "batch_with_missing", "--pre-embedding", "X_emb", "--no-lisi"],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("5 cells have no"), "{err}");
    let m = metrics(dir.path());
    assert_eq!(m["cells_dropped_missing_label_or_batch"], 5);
    assert_eq!(m["n_cells"], 695);
    assert!(m["pre_integration"].as_str().unwrap().starts_with("obsm/X_emb"));
    // The same matrix before and after: nothing removed.
    assert_eq!(m["PCR_batch"].as_f64().unwrap(), 0.0);
}

#[test]
fn nan_in_the_embedding_is_refused_with_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("nan.h5ad");
    std::fs::copy(h5ad(), &copy).unwrap();
    {
        let f = hdf5::File::open_rw(&copy).unwrap();
        let ds = f.dataset("obsm/X_emb").unwrap();
        let mut v: Vec<f32> = ds.read_raw().unwrap();
        v[5 * 16 + 2] = f32::NAN;
        ds.write_raw(&v).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .args(["eval", "integration", "--input"])
        .arg(&copy)
        .arg("--report")
        .arg(dir.path().join("r"))
        .args(["--embedding", "X_emb", "--label-col", "label", "--batch-col", "batch"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("obsm/X_emb") && err.contains("NaN") && err.contains("row 5, column 2"), "{err}");
    assert!(!dir.path().join("r/metrics.json").exists());
}

#[test]
fn an_existing_pca_is_used_for_pcr_as_scib_does() {
    // The fixture keeps scanpy's PCA of X under other names; renamed to obsm/X_pca and uns/pca,
    // scib (and so the CLI) regresses those components as they are instead of X.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pca.h5ad");
    std::fs::copy(h5ad(), &copy).unwrap();
    {
        let f = hdf5::File::open_rw(&copy).unwrap();
        f.group("obsm").unwrap().relink("X_pca_stored", "X_pca").unwrap();
        f.group("uns").unwrap().relink("pca_stored", "pca").unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .args(["eval", "integration", "--input"])
        .arg(&copy)
        .arg("--report")
        .arg(dir.path().join("r"))
        .args(["--embedding", "X_emb", "--label-col", "label", "--batch-col", "batch", "--no-lisi"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = metrics(&dir.path().join("r"));
    let want = &reference()["reference"]["pcr_existing_pca"];
    assert!(m["pre_integration"].as_str().unwrap().contains("uns/pca/variance"), "{}", m["pre_integration"]);
    close("P_pre (existing PCA)", &m["pcr"]["p_pre"], want["P_pre"].as_f64().unwrap(), PCR_TOL);
    close("PCR_batch (existing PCA)", &m["PCR_batch"], want["PCR_batch"].as_f64().unwrap(), PCR_TOL);
}
