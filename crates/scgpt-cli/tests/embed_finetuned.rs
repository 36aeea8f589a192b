//! `scgpt embed` of a fine-tuned integration model: the real `scgpt-train` binary fine-tunes
//! on the bundled pbmc68k_reduced h5ad with `configs/finetune_integration.toml` (the cell-cycle
//! phase as the batch), and `scgpt embed --model RUN/best_model` uses the batch-label map,
//! token genes and tokenisation saved there; the output is read back with anndata. Unseen
//! batch labels: an error listing the known ones, or `--unseen-batch mean`, stated in `uns`.

use std::path::Path;
use std::process::Command;

mod common;
use common::{pbmc, python, root, scgpt};

fn fine_tune(run: &Path) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_scgpt-train"));
    c.arg("--config").arg(root().join("configs/finetune_integration.toml")).arg("--quiet");
    for s in [
        format!("run.dir={}", run.display()),
        format!("data.input=\"{}\"", pbmc().display()),
        "data.allow_non_integer=true".into(),
        "data.batch_col=\"phase\"".into(),
        "model.init_from=\"\"".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=96".into(),
        "train.batch_size=32".into(),
        "train.lr=2e-3".into(),
        "train.epochs=1".into(),
        "run.threads=2".into(),
    ] {
        c.arg("--set").arg(s);
    }
    let out = c.env("HDF5_USE_FILE_LOCKING", "FALSE").output().unwrap();
    assert!(out.status.success(), "scgpt-train failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// obsm["X_scGPT"] shape and row norms, and uns["scgpt_embedding"], as anndata reads them.
fn read_back(path: &Path) -> serde_json::Value {
    let code = r#"
import sys, json, anndata, numpy as np
a = anndata.read_h5ad(sys.argv[1])
e = np.asarray(a.obsm["X_scGPT"])
print(json.dumps({"shape": list(e.shape), "min_norm": float(np.linalg.norm(e, axis=1).min()),
    "max_norm": float(np.linalg.norm(e, axis=1).max()), "finite": bool(np.isfinite(e).all()),
    "notes": [str(x) for x in a.uns.get("scgpt_embedding", [])], "obs": list(a.obs.columns)}))
"#;
    let out = Command::new(python()).arg("-c").arg(code).arg(path).output().expect("run python: make the venv with launch/setup.sh");
    assert!(out.status.success(), "anndata: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn embed_uses_the_fine_tuned_models_batch_labels_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fine_tune(&run);
    let best = run.join("best_model");
    let model = best.to_str().unwrap();
    let out = tmp.path().join("emb.h5ad");
    let o = scgpt(&["embed", "--model", model, "--input", pbmc().to_str().unwrap(), "--output", out.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "embed: {}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("trained for integration") && err.contains("batch labels"), "{err}");
    let r = read_back(&out);
    assert_eq!(r["shape"], serde_json::json!([700, 32]));
    assert!(r["finite"].as_bool().unwrap());
    assert!((r["min_norm"].as_f64().unwrap() - 1.0).abs() < 1e-4 && (r["max_norm"].as_f64().unwrap() - 1.0).abs() < 1e-4, "{r}");
    assert!(r["notes"].as_array().unwrap().iter().any(|n| n == "batch_col=phase"), "{r}");
    assert!(r["obs"].as_array().unwrap().iter().any(|c| c == "bulk_labels"), "the input is kept: {r}");

    // Batch labels the model never saw: an error naming the known ones, or the mean domain.
    let other = tmp.path().join("other.h5ad");
    let o = scgpt(&[
        "embed",
        "--model",
        model,
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        other.to_str().unwrap(),
        "--batch-col",
        "bulk_labels",
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not seen in training") && err.contains("\"G2M\"") && err.contains("--unseen-batch mean"), "{err}");
    assert!(!other.exists(), "no half-written output");
    let o = scgpt(&[
        "embed",
        "--model",
        model,
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        other.to_str().unwrap(),
        "--batch-col",
        "bulk_labels",
        "--unseen-batch",
        "mean",
        "--quiet",
    ]);
    assert!(o.status.success(), "embed --unseen-batch mean: {}", String::from_utf8_lossy(&o.stderr));
    let r = read_back(&other);
    assert_eq!(r["shape"], serde_json::json!([700, 32]));
    assert!(r["finite"].as_bool().unwrap());
    assert!(r["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with("unseen_batch=mean: 700 cells")), "{r}");
}
