//! Parity of the perturbation model against the original 0.2.4 `TransformerGenerator`
//! (fixtures from `tests/gen/model/gen_perturbation.py`), and its input checks.

mod common;

use common::*;
use scgpt_model::burn::module::Module;
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::{
    CellEmbStyle, DecoderActivation, ForwardFlags, IncludeZeroGene, PerturbationConfig, PerturbationInput, TransformerGenerator,
    TUTORIAL_LOAD_PREFIXES,
};
use serde_json::Value;

/// |got − want| ≤ TOL · max(1, |want|).
const TOL: f32 = 1e-4;

fn config_from_ctor(json: &Value) -> PerturbationConfig {
    let c = &json["ctor"];
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let mut cfg = PerturbationConfig::new(json["ntoken"].as_u64().unwrap() as usize, u("d_model"), u("nhead"), u("d_hid"), u("nlayers"))
        .with_pad_token_id(json["pad_token_id"].as_u64().unwrap() as usize);
    cfg.nlayers_cls = u("nlayers_cls");
    cfg.n_cls = u("n_cls");
    cfg.dropout = c["dropout"].as_f64().unwrap();
    cfg.pad_value = c["pad_value"].as_f64().unwrap();
    cfg.pert_pad_id = u("pert_pad_id");
    if let Some(v) = c["do_mvc"].as_bool() {
        cfg.do_mvc = v;
    }
    if let Some(v) = c["explicit_zero_prob"].as_bool() {
        cfg.explicit_zero_prob = v;
    }
    if let Some(v) = c["decoder_adaptive_bias"].as_bool() {
        cfg.decoder_adaptive_bias = v;
    }
    if let Some(v) = c["decoder_activation"].as_str() {
        cfg.decoder_activation = Some(DecoderActivation::from_torch_name(v).unwrap());
    }
    if let Some(v) = c["cell_emb_style"].as_str() {
        cfg.cell_emb_style = match v {
            "cls" => CellEmbStyle::Cls,
            "avg-pool" => CellEmbStyle::AvgPool,
            "w-pool" => CellEmbStyle::WPool,
            _ => unreachable!(),
        };
    }
    if let Some(v) = c["ecs_threshold"].as_f64() {
        cfg.ecs_threshold = v;
    }
    cfg
}

fn input(json: &Value, device: &Device) -> PerturbationInput {
    let inp = &json["inputs"];
    let shape = shape_of(&inp["src"]);
    let (b, l) = (shape[0], shape[1]);
    PerturbationInput {
        src: Tensor::<2, Int>::from_data(TensorData::new(ints(&inp["src"]), [b, l]), device),
        values: Tensor::<2>::from_data(TensorData::new(floats(&inp["values"]), [b, l]), device),
        input_pert_flags: Tensor::<2, Int>::from_data(TensorData::new(ints(&inp["input_pert_flags"]), [b, l]), device),
        src_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(bools(&inp["src_key_padding_mask"]), [b, l]), device),
    }
}

fn flags(json: &Value) -> ForwardFlags {
    let f = &json["flags"];
    ForwardFlags {
        cls: f["CLS"].as_bool().unwrap(),
        cce: f["CCE"].as_bool().unwrap(),
        mvc: f["MVC"].as_bool().unwrap(),
        ecs: f["ECS"].as_bool().unwrap(),
        do_sample: false,
    }
}

/// Compares with the fixture; `skip_rows` (one flag per (b, l)) leaves out padded positions.
fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: &Value, skip_rows: Option<&[bool]>) {
    let (shape, got) = values(got);
    assert_eq!(shape, shape_of(want), "{what}: shape");
    let want = floats(want);
    let per_row = skip_rows.map_or(1, |r| got.len() / r.len());
    let mut worst = (0.0f32, 0usize);
    let mut n = 0;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if skip_rows.is_some_and(|r| r[i / per_row]) {
            continue;
        }
        n += 1;
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err.is_finite(), "{what}[{i}]: got {g}, want {w}");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(n > 0, "{what}: nothing compared");
    eprintln!("{what}: compared {n}, worst rel err {:.2e}", worst.0);
    assert!(worst.0 <= TOL, "{what}: element {} got {} want {} (rel err {:.3e})", worst.1, got[worst.1], want[worst.1], worst.0);
}

fn load(name: &str) -> (Value, TransformerGenerator, Device) {
    let json = fixture_json(name);
    let device = common::test_device();
    let mut model = config_from_ctor(&json).init(&device).unwrap();
    let report = model.load_checkpoint(data(&format!("{name}.pt"))).unwrap();
    assert!(report.missing.is_empty(), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    assert_eq!(report.loaded.len(), json["checkpoint"]["keys"].as_u64().unwrap() as usize);
    (json, model, device)
}

#[test]
fn parity_perturbation_tutorial_settings() {
    let (json, mut model, device) = load("perturbation");
    let o = &json["outputs"];
    let out = model.forward(input(&json, &device), flags(&json)).unwrap();
    // No padding in the tutorial setup: every position is compared.
    assert_close("transformer_output", out.transformer_output, &o["transformer_output"], None);
    assert_close("mlm_output", out.mlm_output.clone(), &o["mlm_output"], None);
    assert_close("mlm_pred", out.mlm_pred, &o["mlm_output"], None);
    assert_close("cell_emb", out.cell_emb, &o["cell_emb"], None);
    assert!(out.mlm_zero_probs.is_none() && out.cls_output.is_none());

    // pred_perturb over the dataset's genes (3 of them missing from the vocabulary).
    let inp = input(&json, &device);
    let gene_ids: Vec<i64> = json["inputs"]["gene_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    for (mode, key) in [(IncludeZeroGene::All, "pred_perturb_all"), (IncludeZeroGene::BatchWise, "pred_perturb_batch_wise")] {
        let got = model.pred_perturb(inp.values.clone(), inp.input_pert_flags.clone(), &gene_ids, mode).unwrap();
        assert_close(key, got, &o[key], None);
    }

    // The tutorial's pretrained load on top: only encoder / value_encoder / transformer_encoder
    // from the whole-human-layout TransformerModel checkpoint.
    let report = model.load_pretrained_prefixes(data("continuous.pt"), &TUTORIAL_LOAD_PREFIXES).unwrap();
    let want_loaded: Vec<String> = json["pretrained"]["loaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| scgpt_model::normalize_key(&x.as_str().unwrap().replace("in_proj_", "Wqkv.")))
        .collect();
    let mut want_loaded = want_loaded;
    want_loaded.sort();
    assert_eq!(report.loaded, want_loaded, "{report}");
    assert!(report
        .missing
        .iter()
        .all(|m| !m.starts_with("encoder.") && !m.starts_with("value_encoder.") && !m.starts_with("transformer_encoder.")));
    assert!(report.skipped.iter().all(|s| s.reason.contains("not under the load prefixes")), "{report}");
    assert!(report.skipped.iter().any(|s| s.key == "flag_encoder.weight"));
    assert!(report.skipped.iter().any(|s| s.key == "decoder.fc.0.weight"));
    let out = model.forward(input(&json, &device), flags(&json)).unwrap();
    assert_close("pretrained_mlm_output", out.mlm_output, &o["pretrained_mlm_output"], None);
}

#[test]
fn parity_perturbation_zero_probs_mvc_adaptive_bias() {
    let (json, model, device) = load("perturbation_zero");
    let o = &json["outputs"];
    let pads = bools(&json["inputs"]["src_key_padding_mask"]);
    let out = model.forward(input(&json, &device), flags(&json)).unwrap();
    assert_close("transformer_output", out.transformer_output, &o["transformer_output"], Some(&pads));
    assert_close("mlm_pred", out.mlm_pred.clone(), &o["mlm_pred"], Some(&pads));
    assert_close("mlm_zero_probs", out.mlm_zero_probs.unwrap(), &o["mlm_zero_probs"], Some(&pads));
    // w-pool over all positions, padding included (defined there: values are 0 at padding).
    assert_close("cell_emb", out.cell_emb, &o["cell_emb"], None);
    assert_close("cls_output", out.cls_output.unwrap(), &o["cls_output"], None);
    assert_close("mvc_pred", out.mvc_pred.clone().unwrap(), &o["mvc_pred"], None);
    assert_close("mvc_zero_probs", out.mvc_zero_probs.unwrap(), &o["mvc_zero_probs"], None);
    let ecs = out.loss_ecs.unwrap().into_scalar::<f32>();
    let want = o["loss_ecs"].as_f64().unwrap() as f32;
    assert!((ecs - want).abs() <= TOL, "loss_ecs {ecs} vs {want}");

    // In eval mode with explicit_zero_prob the original samples: every output element is
    // either 0 or the prediction.
    for (sampled, pred) in [(out.mlm_output, out.mlm_pred), (out.mvc_output.unwrap(), out.mvc_pred.unwrap())] {
        let (_, s) = values(sampled);
        let (_, p) = values(pred);
        assert!(s.iter().zip(&p).all(|(s, p)| *s == 0.0 || s == p));
    }
}

#[test]
fn perturbation_inputs_are_checked() {
    let device = common::test_device();
    let config = PerturbationConfig::new(NTOKEN, 16, 2, 24, 1).with_pad_token_id(PAD_ID);
    let model = config.init(&device).unwrap();
    let src = Tensor::<2, Int>::from_data([[1i64, 2, 3]], &device);
    let good = PerturbationInput {
        src: src.clone(),
        values: Tensor::from_data([[0.5f32, 0.0, 2.0]], &device),
        input_pert_flags: Tensor::from_data([[0i64, 1, 0]], &device),
        src_key_padding_mask: Tensor::<2, Int>::zeros([1, 3], &device).bool(),
    };
    model.forward(good.clone(), ForwardFlags::default()).unwrap();
    let mut bad = good.clone();
    bad.input_pert_flags = Tensor::from_data([[0i64, 3, 0]], &device);
    let e = model.forward(bad, ForwardFlags::default()).unwrap_err().to_string();
    assert!(e.contains("input_pert_flags") && e.contains("outside"), "{e}");
    let mut bad = good.clone();
    bad.values = Tensor::from_data([[0.5f32, 0.0]], &device);
    assert!(model.forward(bad, ForwardFlags::default()).is_err());
    let e = model.forward(good.clone(), ForwardFlags { mvc: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("do_mvc"), "{e}");

    // The pert_pad_id row starts at zero (nn.Embedding's padding_idx).
    let w = values(model.pert_encoder.weight.val()).1;
    assert!(w[2 * 16..3 * 16].iter().all(|&x| x == 0.0));
    let mut c = config.clone();
    c.pert_pad_id = 0;
    let w = values(c.init(&device).unwrap().pert_encoder.weight.val()).1;
    assert!(w[..16].iter().all(|&x| x == 0.0) && w[16..].iter().any(|&x| x != 0.0));
    c.pert_pad_id = 3;
    assert!(c.init(&device).is_err());

    // Adaptive bias divides by the number of nonzero values: an all-zero cell gives NaN in
    // the original, and here.
    let mut c = config.clone();
    c.decoder_adaptive_bias = true;
    let m = c.init(&device).unwrap();
    let mut zero = good.clone();
    zero.values = Tensor::zeros([1, 3], &device);
    let (_, p) = values(m.forward(zero, ForwardFlags::default()).unwrap().mlm_pred);
    assert!(p.iter().all(|x| x.is_nan()));

    // A training-mode model (autodiff device) does not sample by itself.
    let mut c = config.clone();
    c.explicit_zero_prob = true;
    c.dropout = 0.0;
    let ad = Device::flex().autodiff();
    let m = c.init(&ad).unwrap();
    assert!(m.is_training());
    assert!(!m.valid().is_training());
    let inp = PerturbationInput {
        src: good.src.to_device(&ad),
        values: good.values.to_device(&ad),
        input_pert_flags: good.input_pert_flags.to_device(&ad),
        src_key_padding_mask: good.src_key_padding_mask.to_device(&ad),
    };
    let out = m.forward(inp, ForwardFlags::default()).unwrap();
    assert_eq!(values(out.mlm_output).1, values(out.mlm_pred).1);
}
