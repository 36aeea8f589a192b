//! Pure-bf16 training on Flex. Its own test binary: a device's default float type is set once
//! per process, so it cannot share a process with the fp32 tests.

use scgpt_engine::Trainer;

mod common;
use common::{metrics, prep, tiny};

#[test]
fn bf16_training_runs_with_finite_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &[]);
    let run = tmp.path().join("run");
    let cfg = tiny(&run, &shards, &["train.precision=\"bf16\"".into(), "train.max_steps=6".into(), "train.log_every=2".into(), "train.lr=4e-3".into(), "valid.label_set=\"\"".into()]);
    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    t.run().unwrap();
    let gep: Vec<f64> = metrics(&run).iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect();
    assert_eq!(gep.len(), 3);
    assert!(gep.iter().all(|g| g.is_finite()), "{gep:?}");
    assert_eq!(t.model().encoder.embedding.weight.val().dtype(), scgpt_model::burn::tensor::DType::BF16);
}
