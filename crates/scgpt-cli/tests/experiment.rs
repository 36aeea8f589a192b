//! `scgpt experiment run` offline on the bundled-data experiment: the split files, every
//! method's report (fine-tuned from scratch, after a tiny pretraining, kNN, baseline) and
//! report.md with them side by side. Training runs are cut to a few steps (`--train-set`).

use std::process::Command;

mod common;
use common::root;

#[test]
fn the_bundled_annotation_experiment_runs_end_to_end_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let o = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .current_dir(root())
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .args(["experiment", "run", "experiments/annotation_wu2020.toml", "--quiet", "--out"])
        .arg(&out)
        .args(["--train-set", "train.max_steps=3", "--train-set", "train.epochs=1", "--train-set", "model.max_seq_len=128"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "data/reference.h5ad",
        "data/query.h5ad",
        "runs/scratch/best_model/classes.json",
        "runs/tiny_pretrained-pretrain/best_model/best_model.pt",
        "report.md",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let mut accuracies = Vec::new();
    let methods = ["scratch", "tiny_pretrained", "scratch_avgpool", "tiny_pretrained_probe", "knn", "baseline"];
    for m in methods {
        for f in ["metrics.json", "confusion.csv", "confusion.png"] {
            assert!(out.join("reports").join(m).join(f).is_file(), "reports/{m}/{f} missing");
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("reports").join(m).join("metrics.json")).unwrap()).unwrap();
        assert_eq!(v["n_cells"], 66, "{m}: the query is the three patients' 66 cells");
        accuracies.push(v["accuracy"].as_f64().unwrap());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(report.lines().filter(|l| l.starts_with("| scGPT") || l.starts_with("| baseline")).count(), methods.len(), "{report}");
    // The baseline's row is the one measured against scikit-learn (tests/data/eval).
    let baseline = accuracies[methods.len() - 1];
    assert!((baseline - 0.3485).abs() < 0.02, "baseline accuracy {baseline}");
    // A wrong checksum is refused before anything runs.
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(root().join("experiments/annotation_wu2020.toml")).unwrap().replace("85d519686ffa", "00d519686ffa");
    std::fs::write(&bad, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .current_dir(root())
        .args(["experiment", "run"])
        .arg(&bad)
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("sha256"), "{err}");
}

/// The integration recipe offline, on the planted-batch experiment: the planted file, every
/// method's scIB metrics (fine-tuned from scratch and after a tiny pretraining, zero-shot,
/// PCA and Harmony) and report.md with them side by side.
#[test]
fn the_planted_batch_integration_experiment_runs_end_to_end_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let o = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .current_dir(root())
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .args(["experiment", "run", "experiments/integration_planted.toml", "--quiet", "--out"])
        .arg(&out)
        .args([
            "--train-set",
            "train.max_steps=2",
            "--train-set",
            "train.epochs=1",
            "--train-set",
            "preprocess.hvg=100",
            "--train-set",
            "model.max_seq_len=101",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in
        ["data/planted.h5ad", "runs/scratch/best_model/batch_labels.json", "runs/scratch/embedding.h5ad", "zero_shot.h5ad", "report.md"]
    {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for m in ["scratch", "tiny_pretrained", "zero_shot"] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("reports").join(m).join("metrics.json")).unwrap()).unwrap();
        let asw = v["ASW_label"].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&asw), "{m}: ASW_label {asw}");
    }
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("reports/baseline/metrics.json")).unwrap()).unwrap();
    assert!(b["pca"].is_object() && b["harmony"].is_object(), "{b}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(report.lines().filter(|l| l.starts_with("| scGPT") || l.starts_with("| baseline")).count(), 5, "{report}");
    assert!(report.contains("planted_batch"), "{report}");
}

/// The perturbation recipe offline, on the simulated screen: the screen and its truth, the
/// variant's eval report, and report.md with ours and the four baselines over all test
/// conditions and per subgroup, the sentence on which baseline beats ours, and the test doubles
/// of each planted kind. Training is cut to a few steps, the screen to 12 doubles and the
/// control pools to 30 cells (`--set` on the experiment file).
#[test]
fn the_simulated_perturbation_experiment_runs_end_to_end_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let o = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .current_dir(root())
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .args(["experiment", "run", "experiments/perturbation_simulated.toml", "--quiet", "--out"])
        .arg(&out)
        .args(["--train-set", "train.max_steps=4", "--train-set", "train.epochs=1"])
        .args(["--set", "dataset.simulate.doubles=12", "--set", "eval.pool_size=30"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "data/screen.h5ad",
        "data/screen.truth.json",
        "runs/scratch/split.json",
        "runs/scratch/best_model/vocab.json",
        "reports/scratch/per_condition.csv",
        "reports/scratch/per_condition_baselines.csv",
        "report.md",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("reports/scratch/metrics.json")).unwrap()).unwrap();
    let n = m["n_conditions"].as_u64().unwrap();
    assert!(n > 0 && m["baselines"]["linear"].is_object(), "{m}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    // The first table: ours and the four baselines, ours' pearson as metrics.json has it.
    let overall: Vec<&str> = report
        .split("## Per subgroup")
        .next()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("| scGPT") || l.starts_with("| baseline"))
        .collect();
    assert_eq!(overall.len(), 5, "{report}");
    for (row, name) in overall.iter().zip(["scGPT fine-tuned (scratch)", "no change", "training mean", "additive", "linear"]) {
        assert!(row.contains(name), "{row} is not {name}");
    }
    assert!(
        overall[0].starts_with(&format!("| scGPT fine-tuned (scratch) | {n} | {:.3} |", m["pearson"].as_f64().unwrap())),
        "{}",
        overall[0]
    );
    assert!(report.contains("baseline beats it on") || report.contains("No baseline beats scGPT fine-tuned (scratch)"), "{report}");
    // Per subgroup, with the subgroups the split has.
    let subgroups = m["subgroups"].as_object().unwrap();
    assert!(!subgroups.is_empty());
    for g in subgroups.keys() {
        assert!(report.contains(&format!("### {g}\n")), "no table for {g}: {report}");
    }
    // The test doubles by planted kind, counted from the split and the truth.
    let truth: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("data/screen.truth.json")).unwrap()).unwrap();
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("runs/scratch/split.json")).unwrap()).unwrap();
    let test: Vec<&str> = split["test"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(report.contains("| kind | test doubles | scGPT fine-tuned (scratch) | baseline: additive |"), "{report}");
    for kind in ["additive", "synergy"] {
        let k = truth["doubles"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"] == kind && test.contains(&d["condition"].as_str().unwrap()))
            .count();
        assert!(
            report.lines().any(|l| l.starts_with(&format!("| {kind} | {k} |"))),
            "no line for {kind} doubles ({k} in the test set): {report}"
        );
    }
}
