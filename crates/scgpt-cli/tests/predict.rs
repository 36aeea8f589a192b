//! `scgpt predict` end to end: a tiny annotation model fine-tuned by the real `scgpt-train`
//! binary from the bundled pbmc68k_reduced h5ad, its `best_model/` used alone, the output read
//! back with anndata (probabilities, argmax labels, categorical column, input kept) and the
//! report's metrics recomputed independently; the kNN reference mapping; clear errors.

use std::path::Path;
use std::process::Command;

mod common;
use common::{pbmc, python, root, scgpt};

/// A few epochs of annotation on pbmc68k_reduced (10 cell types of `bulk_labels`).
fn fine_tune(run: &Path) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_scgpt-train"));
    c.arg("--config").arg(root().join("configs/finetune_annotation.toml")).arg("--quiet");
    for s in [
        format!("run.dir={}", run.display()),
        format!("data.input=\"{}\"", pbmc().display()),
        "task.label_col=\"bulk_labels\"".into(),
        "model.init_from=\"\"".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=128".into(),
        "train.lr=2e-3".into(),
        "train.epochs=3".into(),
        "run.threads=2".into(),
    ] {
        c.arg("--set").arg(s);
    }
    let out = c.env("HDF5_USE_FILE_LOCKING", "FALSE").output().unwrap();
    assert!(out.status.success(), "scgpt-train failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn check(input: &Path, output: &Path, report: Option<(&str, &Path)>) -> serde_json::Value {
    let mut c = Command::new(python());
    c.arg(root().join("tests/py/check_predictions.py")).arg(input).arg(output);
    if let Some((col, dir)) = report {
        c.arg(col).arg(dir);
    }
    let out = c.output().expect("run python: make the venv with launch/setup.sh");
    assert!(out.status.success(), "check_predictions.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn predict_writes_labels_probabilities_and_a_report_anndata_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fine_tune(&run);
    let model = run.join("best_model");
    // best_model/ alone: copy it away from the run directory.
    let alone = tmp.path().join("model");
    std::fs::create_dir_all(&alone).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), alone.join(e.file_name())).unwrap();
    }
    std::fs::remove_dir_all(&run).unwrap();
    let out = tmp.path().join("pred.h5ad");
    let rep = tmp.path().join("report");
    let o = scgpt(&[
        "predict",
        "--model",
        alone.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--label-col",
        "bulk_labels",
        "--report",
        rep.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["metrics.json", "confusion.csv", "confusion.png"] {
        assert!(rep.join(f).is_file(), "{f} missing");
    }
    let summary = check(&pbmc(), &out, Some(("bulk_labels", &rep)));
    assert_eq!(summary["classes"], 10);
    assert_eq!(summary["unknown"], 0);
    // Trained three epochs on these cells: better than the majority class (27%).
    assert!(summary["accuracy"].as_f64().unwrap() > 0.3, "{summary}");

    // --min-confidence 1 labels every cell Unknown.
    let out2 = tmp.path().join("unknown.h5ad");
    let o = scgpt(&[
        "predict",
        "--model",
        alone.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        out2.to_str().unwrap(),
        "--min-confidence",
        "1.0",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(check(&pbmc(), &out2, None)["unknown"], 700);

    // kNN reference mapping on zero-shot embeddings of the same model (no CLS head used).
    let out3 = tmp.path().join("knn.h5ad");
    let rep3 = tmp.path().join("knn_report");
    let o = scgpt(&[
        "predict",
        "--mode",
        "knn",
        "--model",
        alone.to_str().unwrap(),
        "--reference",
        pbmc().to_str().unwrap(),
        "--reference-label-col",
        "bulk_labels",
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        out3.to_str().unwrap(),
        "--label-col",
        "bulk_labels",
        "--report",
        rep3.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let knn = check(&pbmc(), &out3, Some(("bulk_labels", &rep3)));
    assert_eq!(knn["classes"], 10);

    // A missing truth column names the available ones.
    let o = scgpt(&[
        "predict",
        "--model",
        alone.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        tmp.path().join("y.h5ad").to_str().unwrap(),
        "--label-col",
        "celltype",
        "--report",
        rep.to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bulk_labels"), "{err}");
    // A model without a classifier's class list is a clear error.
    std::fs::remove_file(alone.join("classes.json")).unwrap();
    let o = scgpt(&[
        "predict",
        "--model",
        alone.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        tmp.path().join("x.h5ad").to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("classes.json"), "{err}");
    // A classes file of another width does not match the head.
    std::fs::write(alone.join("classes.json"), r#"["a", "b"]"#).unwrap();
    let o = scgpt(&[
        "predict",
        "--model",
        alone.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        tmp.path().join("x.h5ad").to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("classifier head"), "{err}");
    assert!(!tmp.path().join("x.h5ad").exists(), "no output on failure");
}
