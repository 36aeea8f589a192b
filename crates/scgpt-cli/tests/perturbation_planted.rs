//! Planted-truth recovery of the perturbation recipe: `scgpt-prep simulate-perturbation
//! --modules` plants a synergy program per pair of gene modules (learnable: every double across
//! the same two modules shares it), `scgpt-train --config configs/finetune_perturbation.toml`
//! trains a tiny model from scratch, and `scgpt eval perturbation` scores the held-out doubles
//! whose two genes were both seen in training (`combo_seen2`) beside the baselines. The mean
//! Pearson-delta of ours and of the additive baseline is then compared per planted kind
//! (synergy, additive) from the truth file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{prep_bin, scgpt, train_perturbation};

/// The screen: SCREEN settings, a seed.
fn simulate(dir: &Path, seed: u64) -> PathBuf {
    let out = dir.join("screen.h5ad");
    let o = Command::new(prep_bin())
        .arg("simulate-perturbation")
        .args(SCREEN)
        .args(["--seed", &seed.to_string(), "--quiet", "--out"])
        .arg(&out)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .expect("run scgpt-prep");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// 15 perturbed genes in 3 modules of 5: 75 pairs across modules (3 programs of 20 targets),
/// 30 within; 90 doubles = 60 synergy (about 20 per program) + all 30 additive ones.
const SCREEN: &[&str] = &[
    "--genes",
    "150",
    "--perturbed-genes",
    "15",
    "--modules",
    "3",
    "--doubles",
    "90",
    "--synergy-fraction",
    "0.6667",
    "--cells-per-condition",
    "30",
    "--control-cells",
    "300",
    "--targets-per-gene",
    "5",
    "--synergy-targets",
    "20",
];

fn train(run: &Path, screen: &Path, seed: u64) {
    let sets: Vec<String> = std::iter::once(format!("run.seed={seed}")).chain(TRAIN.iter().map(|s| s.to_string())).collect();
    train_perturbation(run, screen, &sets);
}

/// A one-layer model (64 wide: two layers of 32 learn the singles too slowly to match the
/// additive baseline in this budget), every gene a token, 8 epochs (~370 steps of 32 cells);
/// GEARS's simulation split with 90% of the genes seen, 75% of their doubles trained on.
const TRAIN: &[&str] = &[
    "model.embsize=64",
    "model.nheads=4",
    "model.d_hid=128",
    "model.nlayers=1",
    "model.max_seq_len=150",
    "train.epochs=8",
    "train.batch_size=32",
    "train.lr=3e-3",
    "train.gamma=0.9",
    "run.threads=2",
    "task.train_gene_set_size=0.9",
    "task.combo_seen2_train_frac=0.75",
    "task.split_seed=1",
];

/// `condition → row` of a CSV whose rows name a condition (of one baseline when given).
fn csv_rows(path: &Path, baseline: Option<&str>) -> HashMap<String, HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| header.iter().cloned().zip(l.split(',').map(String::from)).collect::<HashMap<String, String>>())
        .filter(|r| baseline.is_none_or(|b| r["baseline"] == b))
        .map(|r| (r["condition"].clone(), r))
        .collect()
}

/// Mean of a metric over conditions (rows without a value are skipped).
fn mean(rows: &HashMap<String, HashMap<String, String>>, conditions: &[String], metric: &str) -> f64 {
    let v: Vec<f64> = conditions.iter().filter_map(|c| rows[c][metric].parse().ok()).collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// Mean Pearson-delta (and Pearson) on the held-out seen-gene doubles of each planted kind.
#[derive(Debug)]
struct Kind {
    n: usize,
    ours: f64,
    additive: f64,
    train_mean: f64,
    linear: f64,
    ours_pearson: f64,
    no_change_pearson: f64,
}

fn by_kind(tmp: &Path, seed: u64) -> HashMap<String, Kind> {
    let screen = simulate(tmp, seed);
    let truth: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.join("screen.truth.json")).unwrap()).unwrap();
    let run = tmp.join("run");
    train(&run, &screen, seed);
    let report = tmp.join("report");
    let split = run.join("split.json");
    let out = scgpt(&[
        "eval",
        "perturbation",
        "--model",
        run.join("best_model").to_str().unwrap(),
        "--input",
        screen.to_str().unwrap(),
        "--split",
        split.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--no-plots",
        "--pool-size",
        "100",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&split).unwrap()).unwrap();
    let trained: std::collections::HashSet<&str> = split["train"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let ours = csv_rows(&report.join("per_condition.csv"), None);
    let base = |b| csv_rows(&report.join("per_condition_baselines.csv"), Some(b));
    let (additive, train_mean, linear, no_change) = (base("additive"), base("train_mean"), base("linear"), base("no_change"));
    let mut out = HashMap::new();
    for kind in ["synergy", "additive"] {
        let conditions: Vec<String> = truth["doubles"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"] == kind)
            .map(|d| d["condition"].as_str().unwrap().to_string())
            // Held out, of genes seen in training: `combo_seen2` of GEARS's outer split, and both
            // singles in train (the inner val split can hold a seen gene's single out, and then
            // neither the model nor the additive baseline has seen it).
            .filter(|c| split["subgroup"][c] == "combo_seen2" && c.split('+').all(|g| trained.contains(format!("{g}+ctrl").as_str())))
            .collect();
        let k = Kind {
            n: conditions.len(),
            ours: mean(&ours, &conditions, "pearson_delta"),
            additive: mean(&additive, &conditions, "pearson_delta"),
            train_mean: mean(&train_mean, &conditions, "pearson_delta"),
            linear: mean(&linear, &conditions, "pearson_delta"),
            ours_pearson: mean(&ours, &conditions, "pearson"),
            no_change_pearson: mean(&no_change, &conditions, "pearson"),
        };
        println!(
            "seed {seed} {kind:<8} n {:>2}  pearson_delta: ours {:.3} additive {:.3} train_mean {:.3} linear {:.3}  pearson: ours {:.3} no_change {:.3}",
            k.n, k.ours, k.additive, k.train_mean, k.linear, k.ours_pearson, k.no_change_pearson
        );
        out.insert(kind.to_string(), k);
    }
    out
}

/// Margins from 6 seeds (0–5) of this screen and recipe (simulation seed = run.seed; a run is
/// deterministic, the seeds only measure the spread): on the held-out synergy doubles (6–11 per
/// seed) ours beat additive by +0.16..+0.31 in mean Pearson-delta (mean +0.24); on the held-out
/// additive doubles (3–6 per seed) ours minus additive ranged −0.03..+0.06 (mean +0.01). The
/// assertions take half the smallest synergy gain (0.08) and allow a loss of 0.08 on additive
/// doubles (about 2.5× the worst seen; a mean over 3–6 doubles of 30 cells is noisy). Another
/// seed: `SCGPT_PLANTED_SEED=3 cargo test -p scgpt-cli --test perturbation_planted -- --nocapture`.
#[test]
fn training_recovers_planted_module_synergy_on_held_out_seen_gene_doubles() {
    let seed: u64 = std::env::var("SCGPT_PLANTED_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let tmp = tempfile::tempdir().unwrap();
    let k = by_kind(tmp.path(), seed);
    let (syn, add) = (&k["synergy"], &k["additive"]);
    assert!(syn.n >= 4 && add.n >= 3, "too few held-out seen-gene doubles: {k:?}");
    // Where the plant is non-additive, ours beats additive: the module pair's program is learned.
    assert!(syn.ours > syn.additive + 0.08, "synergy doubles: ours {} vs additive {}: {k:?}", syn.ours, syn.additive);
    // Where it is additive, ours is not (much) worse than the sum of the measured singles.
    assert!(add.ours >= add.additive - 0.08, "additive doubles: ours {} vs additive {}: {k:?}", add.ours, add.additive);
    // And on both kinds ours beats the baselines that know nothing of the pair.
    for (kind, x) in [("synergy", syn), ("additive", add)] {
        assert!(x.ours > x.train_mean, "{kind}: ours {} vs train_mean {}", x.ours, x.train_mean);
        assert!(x.ours_pearson > x.no_change_pearson, "{kind}: pearson ours {} vs no_change {}", x.ours_pearson, x.no_change_pearson);
    }
}
