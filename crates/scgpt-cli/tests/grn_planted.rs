//! Both GRN workflows on a model trained on a screen with a planted network (what is asserted,
//! and why not more, is said at the test):
//! `scgpt-prep simulate-perturbation` plants, for each perturbed gene, a known target set (with
//! directions and sizes); a tiny TransformerGenerator is trained on the screen from scratch by
//! `scgpt-train --config configs/finetune_perturbation.toml`; then
//! - `scgpt grn attention --perturbed G` on that model: how well |difference| ranks G's planted
//!   targets above the screen's other genes (AUROC, computed here by the Mann–Whitney count),
//!   for every perturbed gene;
//! - `scgpt grn embedding --reference planted.tsv`: the AUROC that the command reports for the
//!   model's cosine edges against the planted regulator→target list, beside its co-expression
//!   and random baselines.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{prep_bin, scgpt, train_perturbation};

/// 150 genes, 8 perturbed genes with 10 targets each, 40 cells per single and 300 controls.
const SCREEN: &[&str] = &[
    "--genes",
    "150",
    "--perturbed-genes",
    "8",
    "--doubles",
    "4",
    "--synergy-fraction",
    "0",
    "--cells-per-condition",
    "40",
    "--control-cells",
    "300",
    "--targets-per-gene",
    "10",
    "--seed",
    "2",
];

fn simulate(dir: &Path) -> PathBuf {
    let out = dir.join("screen.h5ad");
    let o = Command::new(prep_bin())
        .arg("simulate-perturbation")
        .args(SCREEN)
        .args(["--quiet", "--out"])
        .arg(&out)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .expect("run scgpt-prep");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A one-layer model, every gene a token, 6 epochs at lr 3e-3 (GRN_TRAIN="train.epochs=25
/// model.nlayers=2" adds settings; "train.max_steps=1 train.lr=1e-12" exports the initialised
/// weights).
fn train(run: &Path, screen: &Path) {
    let mut sets: Vec<String> = [
        "model.embsize=64",
        "model.nheads=4",
        "model.d_hid=128",
        "model.nlayers=1",
        "model.max_seq_len=150",
        "train.batch_size=32",
        "train.gamma=0.9",
        "run.threads=2",
        "run.seed=0",
        "train.epochs=6",
        "train.lr=3e-3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(std::env::var("GRN_TRAIN").map(|s| s.split_whitespace().map(String::from).collect::<Vec<_>>()).unwrap_or_default());
    train_perturbation(run, screen, &sets);
}

/// AUROC of `score` for the positives among `items` (ties count half), by counting pairs.
fn auroc(items: &[(String, f64)], positive: &HashSet<String>) -> f64 {
    let pos: Vec<f64> = items.iter().filter(|(g, _)| positive.contains(g)).map(|x| x.1).collect();
    let neg: Vec<f64> = items.iter().filter(|(g, _)| !positive.contains(g)).map(|x| x.1).collect();
    assert!(!pos.is_empty() && !neg.is_empty());
    let wins: f64 = pos
        .iter()
        .map(|p| {
            neg.iter()
                .map(|n| {
                    if p > n {
                        1.0
                    } else if p == n {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
        })
        .sum();
    wins / (pos.len() * neg.len()) as f64
}

/// Mean over the perturbed genes of the AUROC of |difference| in `targets.tsv` for G's planted
/// targets against the screen's other genes (G itself left out).
fn attention_auroc(model: &Path, screen: &Path, truth: &serde_json::Value, out: &Path) -> f64 {
    let singles = truth["singles"].as_array().unwrap();
    let mut sum = 0.0;
    for s in singles {
        let gene = s["gene"].as_str().unwrap();
        let dir = out.join(gene);
        let o = scgpt(&[
            "grn",
            "attention",
            "--model",
            model.to_str().unwrap(),
            "--input",
            screen.to_str().unwrap(),
            "--perturbed",
            gene,
            "--genes",
            "hvg:1000",
            "--deterministic",
            "--quiet",
            "--output",
            dir.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(dir.join("targets.tsv")).unwrap();
        let rows: Vec<(String, f64)> = text
            .lines()
            .skip(1)
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .filter(|f| f[0] != gene)
            .map(|f| (f[0].to_string(), f[3].parse::<f64>().unwrap().abs()))
            .collect();
        let targets: HashSet<String> = s["targets"].as_array().unwrap().iter().map(|t| t["gene"].as_str().unwrap().to_string()).collect();
        sum += auroc(&rows, &targets);
    }
    sum / singles.len() as f64
}

/// `reference_scores.json` of `grn embedding` over every screen gene against the planted list.
fn embedding_scores(model: &Path, screen: &Path, reference: &Path, out: &Path) -> serde_json::Value {
    let genes = out.with_extension("genes.txt");
    std::fs::write(&genes, screen_genes(screen).join("\n") + "\n").unwrap();
    let o = scgpt(&[
        "grn",
        "embedding",
        "--model",
        model.to_str().unwrap(),
        "--input",
        screen.to_str().unwrap(),
        "--gene-col",
        "gene_name",
        "--genes",
        genes.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("reference_scores.json")).unwrap()).unwrap()
}

/// The screen's genes: the trained run's vocabulary (the screen's genes + specials).
fn screen_genes(screen: &Path) -> Vec<String> {
    let vocab: HashMap<String, u64> =
        serde_json::from_str(&std::fs::read_to_string(screen.parent().unwrap().join("run/best_model/vocab.json")).unwrap()).unwrap();
    let mut genes: Vec<(u64, String)> = vocab.into_iter().filter(|(g, _)| !g.starts_with('<')).map(|(g, i)| (i, g)).collect();
    genes.sort();
    genes.into_iter().map(|(_, g)| g).collect()
}

/// Measured with this screen and recipe (2026-12-07): the model's edges do not recover the
/// planted network. `grn attention` |difference| ranks each regulator's planted targets at a
/// mean AUROC of 0.505 (0.520 after 25 epochs with 2 layers; the untrained model: 0.550,
/// 0.511), and `grn embedding` cosine edges score AUROC 0.456 (untrained 0.476), while
/// co-expression over the same cells scores 0.768 and random edges 0.522. So this test asserts
/// what holds: a perturbation-trained `best_model/` loads in both commands (its args.json),
/// the planted network is recoverable from the data (the co-expression baseline finds it),
/// random edges sit at chance, and the verdict says plainly that the model does not beat
/// co-expression; the model's own AUROCs are printed, and recorded in docs/experiments.md.
#[test]
fn grn_workflows_on_a_perturbation_trained_model_score_the_planted_network_beside_baselines() {
    let tmp = tempfile::tempdir().unwrap();
    let screen = simulate(tmp.path());
    let truth: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("screen.truth.json")).unwrap()).unwrap();
    let run = tmp.path().join("run");
    train(&run, &screen);
    let model = run.join("best_model");
    assert!(model.join("args.json").is_file() && model.join("perturbation_config.json").is_file());

    let att = attention_auroc(&model, &screen, &truth, &tmp.path().join("att"));
    assert!((0.0..=1.0).contains(&att));

    let reference = tmp.path().join("planted.tsv");
    let mut lines = String::new();
    for s in truth["singles"].as_array().unwrap() {
        for t in s["targets"].as_array().unwrap() {
            lines += &format!("{}\t{}\n", s["gene"].as_str().unwrap(), t["gene"].as_str().unwrap());
        }
    }
    std::fs::write(&reference, lines).unwrap();
    let emb = embedding_scores(&model, &screen, &reference, &tmp.path().join("emb"));
    let (m, co, rnd) = (
        emb["model"]["auroc"].as_f64().unwrap(),
        emb["baselines"]["coexpression"]["auroc"].as_f64().unwrap(),
        emb["baselines"]["random"]["auroc"].as_f64().unwrap(),
    );
    println!("attention |difference| AUROC on planted targets (mean over regulators): {att:.3}");
    println!("embedding edges AUROC: model {m:.3}, co-expression {co:.3}, random {rnd:.3}");
    assert_eq!(emb["n_reference_edges"], 80);
    assert_eq!(emb["n_edges_evaluated"], 80, "every planted edge is among the screen's genes");
    assert!(co > 0.7, "co-expression recovers the planted network: {emb}");
    assert!((0.4..0.6).contains(&rnd), "random edges at chance: {emb}");
    let verdict = emb["verdict"].as_str().unwrap();
    assert_eq!(verdict.contains("NOT"), m <= co, "{verdict}");
}
