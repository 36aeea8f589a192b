//! The perturbation recipe from the command line: `scgpt-prep simulate-perturbation` makes a
//! screen with planted effects, `scgpt-train --config configs/finetune_perturbation.toml`
//! fine-tunes (a tiny model from scratch), `scgpt predict-perturbation` writes per-condition
//! means that anndata reads, and `scgpt eval perturbation` scores the split's test conditions
//! beside the baselines; its numbers are recomputed here with numpy from the prediction file.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{prep_bin, python, scgpt, train_perturbation};

fn simulate(dir: &Path) -> PathBuf {
    let out = dir.join("screen.h5ad");
    let status = Command::new(prep_bin())
        .args([
            "simulate-perturbation",
            "--genes",
            "80",
            "--perturbed-genes",
            "12",
            "--doubles",
            "10",
            "--cells-per-condition",
            "12",
            "--control-cells",
            "120",
            "--targets-per-gene",
            "6",
            "--seed",
            "5",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run scgpt-prep");
    assert!(status.success());
    out
}

fn train(run: &Path, screen: &Path) {
    let sets = [
        "model.embsize=32",
        "model.nheads=2",
        "model.d_hid=32",
        "model.nlayers=2",
        "model.max_seq_len=48",
        "train.epochs=2",
        "train.batch_size=16",
        "train.lr=2e-3",
        "run.threads=2",
    ];
    train_perturbation(run, screen, &sets);
}

#[test]
fn predict_and_eval_perturbation_agree_with_numpy_and_print_the_baselines() {
    let tmp = tempfile::tempdir().unwrap();
    let screen = simulate(tmp.path());
    let run = tmp.path().join("run");
    train(&run, &screen);
    let model = run.join("best_model");
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    let test: Vec<String> = split["test"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(!test.is_empty());

    // Every test condition, and a double of genes that may never have been perturbed together.
    let pred = tmp.path().join("pred.h5ad");
    let conditions = test.join(",");
    let out = scgpt(&[
        "predict-perturbation",
        "--model",
        model.to_str().unwrap(),
        "--input",
        screen.to_str().unwrap(),
        "--conditions",
        &conditions,
        "--output",
        pred.to_str().unwrap(),
        "--pool-size",
        "50",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let report = tmp.path().join("report");
    let out = scgpt(&[
        "eval",
        "perturbation",
        "--model",
        model.to_str().unwrap(),
        "--input",
        screen.to_str().unwrap(),
        "--split",
        run.join("split.json").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--pool-size",
        "50",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    for name in ["scgpt", "no_change", "train_mean", "additive", "linear"] {
        assert!(printed.contains(name), "the table lists {name}: {printed}");
    }
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap()).unwrap();
    for k in ["pearson", "pearson_de", "pearson_delta", "pearson_de_delta", "pearson_de_nodropout", "pearson_de_delta_nodropout"] {
        assert!(m[k].as_f64().is_some_and(|v| (-1.0..=1.0).contains(&v)), "{k}: {m}");
    }
    assert!(m["subgroups"].as_object().is_some_and(|s| !s.is_empty()), "{m}");
    assert_eq!(m["n_test_conditions"].as_u64(), Some(test.len() as u64));
    // no_change has no delta (a zero vector): null, not 0 or NaN.
    assert!(m["baselines"]["no_change"]["pearson_delta"].is_null(), "{m}");
    assert!(m["baselines"]["no_change"]["pearson"].as_f64().is_some());
    for b in ["train_mean", "additive", "linear"] {
        assert!(m["baselines"][b].is_object(), "{b}: {m}");
    }
    assert!(report.join("per_condition.csv").is_file() && report.join("per_condition_baselines.csv").is_file());
    let plots: Vec<_> = std::fs::read_dir(report.join("plots")).unwrap().collect();
    assert!(!plots.is_empty() && plots.len() <= 10, "{} plots", plots.len());

    // Recompute pearson and pearson_delta of every test condition from the prediction file and
    // the screen (mean of the condition's cells; delta against the mean of all control cells).
    let script = r#"
import sys, csv, anndata, numpy as np
pred, screen, per = anndata.read_h5ad(sys.argv[1]), anndata.read_h5ad(sys.argv[2]), sys.argv[3]
X = screen.X.toarray() if hasattr(screen.X, "toarray") else np.asarray(screen.X)
X = X.astype(np.float64)
ctrl = X[(screen.obs["condition"] == "ctrl").values].mean(0)
P = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
assert list(pred.var_names) == list(screen.var_names), "var = the screen's genes"
rows = {r["condition"]: r for r in csv.DictReader(open(per))}
worst = 0.0
for i, c in enumerate(pred.obs["condition"]):
    truth = X[(screen.obs["condition"] == c).values].mean(0)
    p = P[i].astype(np.float64)
    r = np.corrcoef(truth, p)[0, 1]
    d = np.corrcoef(truth - ctrl, p - ctrl)[0, 1]
    worst = max(worst, abs(r - float(rows[c]["pearson"])), abs(d - float(rows[c]["pearson_delta"])))
print(len(rows), worst)
"#;
    let out = Command::new(python()).arg("-c").arg(script).arg(&pred).arg(&screen).arg(report.join("per_condition.csv")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let (n, worst): (usize, f64) = (it.next().unwrap().parse().unwrap(), it.next().unwrap().parse().unwrap());
    assert_eq!(n, test.len());
    // float32 predictions written, float64 here: agreement to float32 precision.
    assert!(worst < 1e-4, "eval's per-condition Pearson differs from numpy on predict-perturbation's output by {worst}");
}

#[test]
fn a_gene_outside_the_screen_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let screen = simulate(tmp.path());
    let run = tmp.path().join("run");
    train(&run, &screen);
    let model = run.join("best_model");
    let pred = tmp.path().join("pred.h5ad");
    let out = scgpt(&[
        "predict-perturbation",
        "--model",
        model.to_str().unwrap(),
        "--input",
        screen.to_str().unwrap(),
        "--conditions",
        "NOTAGENE+ctrl",
        "--output",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("NOTAGENE") && e.contains("not among the genes"), "{e}");
    let out = scgpt(&[
        "predict-perturbation",
        "--model",
        model.to_str().unwrap(),
        "--input",
        screen.to_str().unwrap(),
        "--conditions",
        "A+B+C",
        "--output",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be read"));
    assert!(!pred.exists(), "no output on error");
}
