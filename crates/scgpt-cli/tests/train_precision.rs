//! `train.precision = "bf16"` learns: bf16 compute with fp32 master weights and Adam moments
//! tracks the fp32 run at lr 1e-4, and LayerNorm gains move; pure bf16 (`"bf16-pure"`) rounds
//! those updates away. Each run is its own `scgpt-train` process: a device's default float type
//! is set once per process.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{prep, prep_bin, root};
use scgpt_model::burn::tensor::Device;

const STEPS: u64 = 200;

fn train(run: &Path, shards: &Path, precision: &str) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_scgpt-train"));
    c.arg("--config").arg(root().join("configs/pretrain_tiny.toml")).arg("--quiet");
    for s in [
        format!("run.dir={}", run.display()),
        format!("data.shards=[\"{}\"]", shards.display()),
        "valid.label_set=\"\"".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.max_seq_len=64".into(),
        "model.dropout=0.0".into(),
        "train.lr=1e-4".into(),
        "train.warmup_steps=0".into(),
        "train.schedule=\"constant\"".into(),
        format!("train.max_steps={STEPS}"),
        "train.log_every=10".into(),
        "train.save_every=1000".into(),
        "train.eval_every=1000".into(),
        format!("train.precision=\"{precision}\""),
        "run.threads=2".into(),
    ] {
        c.arg("--set").arg(s);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{precision}: {}", String::from_utf8_lossy(&out.stderr));
}

fn gep(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss_gep"].as_f64())
        .collect()
}

fn last_checkpoint(run: &Path) -> PathBuf {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
    steps.sort();
    steps.pop().expect("a checkpoint").join("model")
}

/// The LayerNorm gains of every encoder layer after the run (fresh gains are exactly 1).
fn gains(run: &Path) -> Vec<f32> {
    let ck = scgpt_model::load_native(last_checkpoint(run), &Device::flex()).unwrap();
    let m = ck.model;
    assert_eq!(
        m.transformer_encoder.layers[0].norm1.gamma.val().dtype(),
        scgpt_model::burn::tensor::DType::F32,
        "checkpoints hold fp32 parameters"
    );
    m.transformer_encoder
        .layers
        .iter()
        .flat_map(|l| [l.norm1.gamma.val(), l.norm2.gamma.val()])
        .flat_map(|t| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap())
        .collect()
}

fn moved(g: &[f32]) -> f64 {
    g.iter().filter(|&&x| x != 1.0).count() as f64 / g.len() as f64
}

#[test]
fn mixed_bf16_tracks_fp32_and_moves_layer_norm_gains() {
    assert!(prep_bin().is_file(), "{} not built: run `cargo test --workspace`", prep_bin().display());
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let runs = ["fp32", "bf16", "bf16-pure"].map(|p| {
        let run = tmp.path().join(p);
        train(&run, &shards, p);
        run
    });
    let [fp32, mixed, pure] = runs.each_ref().map(|r| gep(r));
    assert_eq!(fp32.len(), (STEPS / 10) as usize);
    // The curve: every logged GEP (the mean over 10 steps) within 3% of fp32's.
    for (i, (a, b)) in fp32.iter().zip(&mixed).enumerate() {
        assert!((a - b).abs() <= 0.03 * a, "step {}: GEP {b} (bf16) vs {a} (fp32)", 10 * (i + 1));
    }
    assert!(fp32.last().unwrap() < &(0.95 * fp32[0]), "fp32 did not learn: {fp32:?}");
    let (g32, gmixed, gpure) = (gains(&runs[0]), gains(&runs[1]), gains(&runs[2]));
    assert!(moved(&g32) > 0.9, "fp32 gains moved: {}", moved(&g32));
    assert!(moved(&gmixed) > 0.9, "bf16 (fp32 masters) gains moved: {}", moved(&gmixed));
    // The masters follow the fp32 run's gains closely.
    let worst = g32.iter().zip(&gmixed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let travel = g32.iter().map(|a| (a - 1.0).abs()).fold(0f32, f32::max);
    assert!(worst < 0.25 * travel, "bf16 gains differ from fp32's by {worst} (they moved up to {travel})");
    // Pure bf16 cannot represent 1 ± 1e-4: its gains stay at 1 (or move far less).
    assert!(moved(&gpure) < 0.1, "pure bf16 gains moved: {}", moved(&gpure));
    eprintln!("GEP fp32 {fp32:?}\nGEP bf16 {mixed:?}\nGEP bf16-pure {pure:?}\nmax gain travel {travel}, bf16 vs fp32 {worst}");
}
