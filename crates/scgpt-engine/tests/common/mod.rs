//! Shared by the engine's test binaries: bundled data to shards, tiny configs, metrics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use scgpt_engine::config::{resolve, TrainConfig};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn python() -> PathBuf {
    std::env::var_os("SCGPT_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// scgpt-prep on a bundled h5ad (deterministic binning, small shards so there are several).
pub fn prep(h5ad: &str, out: &Path, extra: &[&str]) {
    use scgpt_config::{Layered, Origin};
    let mut sets = vec![
        format!("input.paths=[\"{}\"]", root().join("tests/data").join(h5ad).display()),
        format!("output.dir=\"{}\"", out.display()),
        "output.shard_cells=64".to_string(),
        "binning.deterministic=true".to_string(),
        "run.progress=false".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let layered = Layered::new().with_toml_str(scgpt_prep::config::DEFAULTS_TOML, Origin::Defaults).unwrap().with_sets(&sets).unwrap();
    let cfg: scgpt_prep::config::PrepConfig = layered.build().unwrap();
    scgpt_prep::pipeline::Prep::new(cfg).unwrap().run().unwrap();
}

pub fn tiny(run: &Path, shards: &Path, extra: &[String]) -> TrainConfig {
    let mut sets = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.shards=[\"{}\"]", shards.display()),
        format!("valid.label_set=\"{}\"", shards.display()),
        "valid.label_col=\"cluster_orig\"".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=96".into(),
        "train.batch_size=16".into(),
        "train.warmup_steps=5".into(),
        "run.threads=2".into(),
    ];
    sets.extend(extra.iter().cloned());
    resolve(None, &sets).unwrap()
}

pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
