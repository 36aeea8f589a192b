//! Mixed-precision training on Flex (`train.precision = "bf16"`: bf16 compute, fp32 masters and
//! moments). Its own test binary: a device's default float type is set once per process, so it
//! cannot share a process with the fp32 tests. That it learns like fp32 is
//! `crates/scgpt-cli/tests/train_precision.rs`.

use scgpt_engine::optim::{flatten_params, list_params};
use scgpt_engine::Trainer;
use scgpt_model::burn::tensor::DType;

mod common;
use common::{metrics, prep, tiny};

#[test]
fn bf16_training_keeps_fp32_masters_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &["output.obs_cols=[\"cluster_orig\"]"]);
    let cfg = |run: &std::path::Path| {
        tiny(
            run,
            &shards,
            &[
                "train.precision=\"bf16\"".into(),
                "train.max_steps=6".into(),
                "train.log_every=2".into(),
                "train.save_every=3".into(),
                "train.eval_every=3".into(),
                "train.lr=4e-3".into(),
            ],
        )
    };
    let run = tmp.path().join("run");
    let mut t = Trainer::new(cfg(&run), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    t.run().unwrap();
    let gep: Vec<f64> = metrics(&run).iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect();
    assert_eq!(gep.len(), 3);
    assert!(gep.iter().all(|g| g.is_finite()), "{gep:?}");
    // Validation (MSE and the embedding metrics) runs on the bf16 compute copy.
    let valid: Vec<f64> = metrics(&run).iter().filter_map(|l| l["valid/mse"].as_f64()).collect();
    assert_eq!(valid.len(), 2, "validated at steps 3 and 6");
    assert!(valid.iter().all(|v| v.is_finite()), "{valid:?}");
    assert!(metrics(&run).iter().any(|l| l["valid/knn_accuracy"].is_number()), "embedding metrics in bf16");
    assert_eq!(t.model().encoder.embedding.weight.val().dtype(), DType::F32, "masters stay fp32");
    let want = flatten_params(t.model(), &list_params(t.model()).unwrap());

    // Interrupted at step 3 and resumed: the fp32 masters and moments come back as they were.
    let other = tmp.path().join("resumed");
    let mut a = Trainer::new(cfg(&other), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    a.run_until(Some(3)).unwrap();
    drop(a);
    let mut b = Trainer::new(cfg(&other), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    assert_eq!(b.state.step, 3);
    b.run().unwrap();
    assert_eq!(b.model().encoder.embedding.weight.val().dtype(), DType::F32);
    let got = flatten_params(b.model(), &list_params(b.model()).unwrap());
    let differing = want.iter().zip(&got).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{differing} parameters differ after a bf16 resume");

    // Blockwise attention under bf16 compute: trains with finite losses too.
    let blockwise = tmp.path().join("blockwise");
    let mut c = tiny(
        &blockwise,
        &shards,
        &[
            "train.precision=\"bf16\"".into(),
            "run.attention=\"blockwise\"".into(),
            "run.attention_block_rows=16".into(),
            "train.max_steps=4".into(),
            "train.log_every=2".into(),
            "train.lr=4e-3".into(),
            "valid.label_set=\"\"".into(),
        ],
    );
    c.train.eval_every = 100;
    let mut t = Trainer::new(c, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    t.run().unwrap();
    let gep: Vec<f64> = metrics(&blockwise).iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect();
    assert_eq!(gep.len(), 2);
    assert!(gep.iter().all(|g| g.is_finite()), "{gep:?}");
}
