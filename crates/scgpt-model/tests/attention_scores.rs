//! The attention-GRN hook against the original: `TransformerModel::attention_scores` and the
//! rank normalisation of `scgpt_model::attention_grn`, on `tests/data/model/attention_grn.*`
//! written by `tests/gen/model/gen_attention_scores.py` (the original 0.2.4 model with a plain
//! `bn`, randomised, scored step for step as `Tutorial_Attention_GRN` does).

use scgpt_model::attention_grn::{rank_normalise, rank_normalised_column};
use scgpt_model::burn::tensor::Device;
use scgpt_model::{load_pretrained, BatchNormStyle, ModelConfig, TransformerModel};
use serde_json::Value;

mod common;
use common::{data, fixture_json, floats, shape_of, values};

/// |got − want| ≤ TOL · max(1, |want|), as the other parity tests.
const TOL: f32 = 1e-4;

fn model_on(device: &Device) -> TransformerModel {
    let json = fixture_json("attention_grn");
    let ntoken = json["ntoken"].as_u64().unwrap() as usize;
    let pad = json["pad_token_id"].as_u64().unwrap() as usize;
    let config = ModelConfig::from_args_json(data("attention_grn.args.json"), ntoken).unwrap().with_pad_token_id(pad);
    assert_eq!(config.domain_spec_batchnorm, BatchNormStyle::BatchNorm);
    let mut model = config.init(device).unwrap();
    let report = load_pretrained(&mut model, data("attention_grn.pt")).unwrap();
    for k in ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"] {
        assert!(report.loaded.iter().any(|l| l == k), "{k} loaded: {report}");
    }
    assert!(report.missing.is_empty(), "{report}");
    // Only the int64 counter has no place in the model.
    assert!(report.skipped.iter().all(|s| s.key == "bn.num_batches_tracked"), "{report}");
    model
}

fn input(batch: &Value, device: &Device) -> scgpt_model::ModelInput {
    common::fixture_input(batch, device)
}

/// Worst relative error; asserts it is within TOL.
fn compare(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / w.abs().max(1.0);
        assert!(e.is_finite(), "{what}[{i}]: got {g}, want {w}");
        if e > worst.0 {
            worst = (e, i);
        }
    }
    eprintln!("{what}: {} values, worst rel err {:.2e}", got.len(), worst.0);
    assert!(worst.0 <= TOL, "{what}[{}]: got {} want {} ({:.2e} > {TOL:e})", worst.1, got[worst.1], want[worst.1], worst.0);
    worst.0
}

#[test]
fn raw_scores_match_the_tutorial_for_every_layer() {
    let device = common::test_device();
    let model = model_on(&device);
    let json = fixture_json("attention_grn");
    let n = json["nlayers"].as_u64().unwrap() as isize;
    let mut worst = 0f32;
    for name in ["tutorial", "padded"] {
        let batch = &json["batches"][name];
        for layer in 0..n {
            let want = &batch["scores"][layer.to_string()];
            // The same layer by its index and by its negative index.
            for index in [layer, layer - n] {
                let got = model.attention_scores(input(batch, &device), index).unwrap();
                let (shape, got) = values(got);
                assert_eq!(shape, shape_of(want), "{name} layer {index}: shape [B, H, L, L]");
                worst = worst.max(compare(&format!("{name} layer {index}"), &got, &floats(want)));
            }
        }
    }
    eprintln!("attention scores: worst rel err over both batches and all layers {worst:.2e}");
}

#[test]
fn rank_normalisation_matches_the_tutorial() {
    let json = fixture_json("attention_grn");
    let batch = &json["batches"]["tutorial"];
    let h = json["nheads"].as_u64().unwrap() as usize;
    let last = (json["nlayers"].as_u64().unwrap() - 1).to_string();
    let scores = floats(&batch["scores"][&last]);
    let want = floats(&batch["rank_normalised_last_layer"]);
    let shape = shape_of(&batch["rank_normalised_last_layer"]);
    let (b, m) = (shape[0], shape[1]);
    assert_eq!(scores.len(), b * h * m * m);
    // From the original's own scores: the procedure alone.
    let mut worst = 0f32;
    for c in 0..b {
        let cell = &scores[c * h * m * m..(c + 1) * h * m * m];
        let got = rank_normalise(cell, h, m).unwrap();
        let want = &want[c * m * m..(c + 1) * m * m];
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs());
        }
        for col in 0..m {
            let column = rank_normalised_column(cell, h, m, col).unwrap();
            for i in 0..m {
                assert_eq!(column[i], got[i * m + col], "cell {c} column {col} row {i}");
            }
        }
    }
    eprintln!("rank normalisation from the original's scores: worst abs err {worst:.2e}");
    assert!(worst <= 1e-6, "{worst}");

    // From our scores: the same ranks (no near-tie flips between the two fp32 computations).
    let device = common::test_device();
    let model = model_on(&device);
    let ours = values(model.attention_scores(input(batch, &device), -1).unwrap()).1;
    let mut worst = 0f32;
    for c in 0..b {
        let got = rank_normalise(&ours[c * h * m * m..(c + 1) * h * m * m], h, m).unwrap();
        for (g, w) in got.iter().zip(&want[c * m * m..(c + 1) * m * m]) {
            worst = worst.max((g - w).abs());
        }
    }
    eprintln!("rank normalisation end to end: worst abs err {worst:.2e}");
    assert!(worst <= 1e-6, "{worst}");
}

#[test]
fn the_hook_is_read_only_in_training_mode() {
    // On an autodiff device the model is in training mode (dropout on, BatchNorm on batch
    // statistics and updating its running stats); the hook must still score as in eval mode
    // and leave the running statistics alone.
    let device = Device::flex().autodiff();
    let model = model_on(&device);
    let json = fixture_json("attention_grn");
    let batch = &json["batches"]["tutorial"];
    let before = values(model.bn.as_ref().unwrap().running_mean.value_sync()).1;
    let got = model.attention_scores(input(batch, &device), -1).unwrap();
    assert!(!got.device().is_autodiff(), "scores come back without a graph");
    compare("autodiff device, last layer", &values(got).1, &floats(&batch["scores"]["2"]));
    let after = values(model.bn.as_ref().unwrap().running_mean.value_sync()).1;
    assert_eq!(before, after, "running mean untouched");
}

#[test]
fn layers_outside_the_model_are_errors() {
    let device = common::test_device();
    let model = model_on(&device);
    let json = fixture_json("attention_grn");
    let batch = &json["batches"]["tutorial"];
    for bad in [3isize, -4, 100] {
        let e = model.attention_scores(input(batch, &device), bad).unwrap_err().to_string();
        assert!(e.contains("it has 3"), "{bad}: {e}");
    }
}
