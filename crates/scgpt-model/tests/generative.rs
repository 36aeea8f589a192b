//! The dev-temp generative pretraining forward (reference §2.2) against
//! `tests/data/model/generative.json`, produced by `gen_parity.py::dev_temp_generative_forward`.

use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::layers::AttentionMode;
use scgpt_model::{load_pretrained, ForwardFlags, GenerativeInput, ModelConfig, ModelInput, TransformerModel};
use serde_json::Value;

mod common;
use common::{assert_grad, bools, data_dir, floats, ints, shape_of};

const TOL: f32 = 1e-4;
fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: &Value, skip_rows: Option<&[bool]>) {
    assert_eq!(got.dims().to_vec(), shape_of(want), "{what}: shape");
    let got: Vec<f32> = got.into_data().convert::<f32>().try_into_vec().unwrap();
    let want = floats(want);
    let per_row = skip_rows.map_or(got.len(), |r| got.len() / r.len());
    let mut compared = 0;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if skip_rows.is_some_and(|r| r[i / per_row]) {
            continue;
        }
        compared += 1;
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err <= TOL, "{what}[{i}]: got {g}, want {w} (rel err {err:.2e})");
    }
    assert!(compared > 0);
}

struct Setup {
    json: Value,
    model: TransformerModel,
    input: GenerativeInput,
    /// Per (b, position) of the concatenated [pcpt; gen] sequence: true = padding.
    pads: Vec<bool>,
}

fn setup() -> Setup {
    setup_on(common::test_device(), None)
}

/// The fixture's model and batch on `device`, with the model's dropout replaced when given.
fn setup_on(device: Device, dropout: Option<f64>) -> Setup {
    let dir = data_dir();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("generative.json")).unwrap()).unwrap();
    let config = ModelConfig::from_args_json(dir.join("generative.args.json"), 100).unwrap().with_pad_token_id(97);
    assert!(config.use_generative_training);
    let mut config = config;
    if let Some(p) = dropout {
        config.dropout = p;
    }
    let mut model = config.init(&device).unwrap();
    let report = load_pretrained(&mut model, dir.join("generative.pt")).unwrap();
    assert!(report.skipped.is_empty(), "{report}");
    assert!(report.loaded.iter().any(|k| k == "flag_encoder.weight"));
    assert!(report.missing.iter().all(|k| k.starts_with("cls_decoder.")), "{report}");

    let inp = &json["inputs"];
    let [b, p] = shape_of(&inp["pcpt_genes"])[..] else { panic!() };
    let g = shape_of(&inp["gen_genes"])[1];
    let pm = bools(&inp["pcpt_key_padding_mask"]);
    let gm = bools(&inp["gen_key_padding_mask"]);
    let mut pads = Vec::new();
    for i in 0..b {
        pads.extend_from_slice(&pm[i * p..(i + 1) * p]);
        pads.extend_from_slice(&gm[i * g..(i + 1) * g]);
    }
    let input = GenerativeInput {
        pcpt_genes: Tensor::<2, Int>::from_data(TensorData::new(ints(&inp["pcpt_genes"]), [b, p]), &device),
        pcpt_values: Tensor::<2>::from_data(TensorData::new(floats(&inp["pcpt_values"]), [b, p]), &device),
        pcpt_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(pm, [b, p]), &device),
        gen_genes: Some(Tensor::<2, Int>::from_data(TensorData::new(ints(&inp["gen_genes"]), [b, g]), &device)),
        gen_key_padding_mask: Some(Tensor::<2, Bool>::from_data(TensorData::new(gm, [b, g]), &device)),
        batch_labels: None,
        input_cell_emb: None,
    };
    Setup { json, model, input, pads }
}

fn mvc() -> ForwardFlags {
    ForwardFlags { mvc: true, ..Default::default() }
}

#[test]
fn generative_forward_matches_dev_temp() {
    let s = setup();
    let o = &s.json["outputs"];
    let out = s.model.generative_forward(s.input.clone(), mvc()).unwrap();
    // Padded pcpt rows differ by construction (flash-attn zeroes them before out_proj) and
    // never influence other rows; compare the rest.
    assert_close("transformer_output", out.transformer_output, &o["transformer_output"], Some(&s.pads));
    let b = s.input.pcpt_genes.dims()[0];
    let p = s.input.pcpt_genes.dims()[1];
    let pm: Vec<bool> = s.pads.chunks(s.pads.len() / b).flat_map(|r| r[..p].to_vec()).collect();
    let gm: Vec<bool> = s.pads.chunks(s.pads.len() / b).flat_map(|r| r[p..].to_vec()).collect();
    assert_close("pcpt_preds", out.pcpt_preds, &o["pcpt_preds"], Some(&pm));
    assert_close("gen_preds", out.gen_preds.unwrap(), &o["gen_preds"], Some(&gm));
    assert_close("cell_emb", out.cell_emb.clone(), &o["cell_emb"], None);
    assert_close("mvc_output", out.mvc_output.unwrap(), &o["mvc_output"], None);

    // Pass 2 of pretraining: the same inputs with pass 1's cell embedding at <cls>.
    let mut input2 = s.input.clone();
    input2.input_cell_emb = Some(out.cell_emb);
    let out2 = s.model.generative_forward(input2, ForwardFlags::default()).unwrap();
    assert_close("pass2_transformer_output", out2.transformer_output, &o["pass2_transformer_output"], Some(&s.pads));
    assert_close("pass2_gen_preds", out2.gen_preds.unwrap(), &o["pass2_gen_preds"], Some(&gm));
}

#[test]
fn pcpt_stream_is_the_standard_encoder() {
    // pcpt tokens never attend to gen tokens, so with or without gen tokens the pcpt rows
    // equal the ordinary forward on the pcpt sequence alone.
    let s = setup();
    let with_gen = s.model.generative_forward(s.input.clone(), ForwardFlags::default()).unwrap();
    let mut alone = s.input.clone();
    alone.gen_genes = None;
    alone.gen_key_padding_mask = None;
    let alone = s.model.generative_forward(alone, ForwardFlags::default()).unwrap();
    assert!(alone.gen_preds.is_none());
    let standard = s
        .model
        .forward(
            ModelInput {
                src: s.input.pcpt_genes.clone(),
                values: s.input.pcpt_values.clone(),
                src_key_padding_mask: s.input.pcpt_key_padding_mask.clone(),
                batch_labels: None,
            },
            ForwardFlags::default(),
        )
        .unwrap();
    let [b, p] = s.input.pcpt_genes.dims();
    let d = s.model.config.d_model;
    let a = with_gen.transformer_output.slice([0..b, 0..p, 0..d]);
    let diff = (a.clone() - alone.transformer_output.clone()).abs().max().into_scalar::<f32>();
    assert!(diff < 1e-5, "pcpt rows depend on gen tokens: {diff}");
    let diff = (alone.transformer_output - standard.transformer_output).abs().max().into_scalar::<f32>();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn gen_tokens_do_not_see_each_other() {
    let s = setup();
    let base = s.model.generative_forward(s.input.clone(), ForwardFlags::default()).unwrap();
    // Change gen token 1 of row 0; gen token 0 of row 0 must not move, token 1 must.
    let mut ids: Vec<i64> = s.input.gen_genes.clone().unwrap().into_data().convert::<i64>().try_into_vec().unwrap();
    ids[1] = (ids[1] + 1) % 97;
    let g = s.input.gen_genes.as_ref().unwrap().dims();
    let mut changed = s.input.clone();
    changed.gen_genes = Some(Tensor::<2, Int>::from_data(TensorData::new(ids, g), &Device::flex()));
    let other = s.model.generative_forward(changed, ForwardFlags::default()).unwrap();
    let p = s.input.pcpt_genes.dims()[1];
    let d = s.model.config.d_model;
    let row = |t: &Tensor<3>, j: usize| t.clone().slice([0..1, j..j + 1, 0..d]);
    let same = (row(&base.transformer_output, p) - row(&other.transformer_output, p)).abs().max().into_scalar::<f32>();
    let moved = (row(&base.transformer_output, p + 1) - row(&other.transformer_output, p + 1)).abs().max().into_scalar::<f32>();
    assert_eq!(same, 0.0);
    assert!(moved > 1e-3);
}

#[test]
fn generative_forward_needs_the_flag_encoder() {
    let config = ModelConfig::from_args_json(data_dir().join("continuous.args.json"), 100).unwrap();
    let model = config.init(&Device::flex()).unwrap();
    let s = setup();
    let err = model.generative_forward(s.input, ForwardFlags::default()).unwrap_err();
    assert!(err.to_string().contains("use_generative_training"), "{err}");
}

/// The whole two-pass generative pretraining loss (GEP + GEPC, then the cell-prompted pass with
/// pass 1's detached cell embedding), as scgpt-train's generative task computes it, against
/// `generative_grad.json` (gen_parity.py::generate_generative_grad): loss, terms and gradients,
/// with the explicit and with the blockwise attention.
#[test]
fn two_pass_generative_gradients_match_pytorch_in_both_attention_modes() {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(data_dir().join("generative_grad.json")).unwrap()).unwrap();
    for mode in [AttentionMode::Explicit, AttentionMode::Blockwise { block_rows: 2 }] {
        let device = Device::flex().autodiff();
        let Setup { model, input, .. } = setup_on(device.clone(), Some(0.0));
        let model = model.with_attention(mode);
        let target_json = &fixture["inputs"]["gen_target"];
        let [b, g] = shape_of(target_json)[..] else { panic!() };
        let p = input.pcpt_genes.dims()[1];
        let target = Tensor::<2>::from_data(TensorData::new(floats(target_json), [b, g]), &device);
        let keep = input.gen_key_padding_mask.clone().unwrap().bool_not().float();
        let sq = |pred: Tensor<2>| ((pred - target.clone()) * keep.clone()).square().sum();
        let out = model.generative_forward(input.clone(), mvc()).unwrap();
        let gep = sq(out.gen_preds.clone().unwrap());
        let gepc = sq(out.mvc_output.clone().unwrap().slice([0..b, p..p + g]));
        let second = GenerativeInput { input_cell_emb: Some(out.cell_emb.detach()), ..input };
        let cell_prompt = sq(model.generative_forward(second, ForwardFlags::default()).unwrap().gen_preds.unwrap());
        let units = keep.sum().into_scalar::<f32>();
        let loss = (gep.clone() + gepc.clone() + cell_prompt.clone()).div_scalar(units);
        for (name, t) in [("gep", &gep), ("gepc", &gepc), ("cell_prompt", &cell_prompt), ("loss", &loss)] {
            let got = t.clone().into_scalar::<f32>();
            let want = if name == "loss" { fixture["loss"].as_f64() } else { fixture["terms"][name].as_f64() }.unwrap() as f32;
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{mode:?} {name}: {got} vs {want}");
        }
        let grads = loss.backward();
        let gr = &fixture["grads"];
        let layers = &model.transformer_encoder.layers;
        let what = |s: &str| format!("{mode:?} {s}");
        assert_grad(&what("embedding"), model.encoder.embedding.weight.val().grad(&grads), &gr["encoder.embedding.weight"], false);
        assert_grad(&what("enc_norm"), model.encoder.enc_norm.gamma.val().grad(&grads), &gr["encoder.enc_norm.weight"], false);
        assert_grad(
            &what("flag_encoder"),
            model.flag_encoder.as_ref().unwrap().weight.val().grad(&grads),
            &gr["flag_encoder.weight"],
            false,
        );
        let scgpt_model::layers::ValueEncoder::Continuous(ve) = model.value_encoder.as_ref().unwrap() else { panic!() };
        assert_grad(&what("value_encoder.linear1"), ve.linear1.weight.val().grad(&grads), &gr["value_encoder.linear1.weight"], true);
        assert_grad(
            &what("layers.0.Wqkv.weight"),
            layers[0].self_attn.Wqkv.weight.val().grad(&grads),
            &gr["transformer_encoder.layers.0.self_attn.in_proj_weight"],
            true,
        );
        assert_grad(
            &what("layers.0.Wqkv.bias"),
            layers[0].self_attn.Wqkv.bias.as_ref().unwrap().val().grad(&grads),
            &gr["transformer_encoder.layers.0.self_attn.in_proj_bias"],
            false,
        );
        assert_grad(
            &what("layers.1.Wqkv.weight"),
            layers[1].self_attn.Wqkv.weight.val().grad(&grads),
            &gr["transformer_encoder.layers.1.self_attn.in_proj_weight"],
            true,
        );
        assert_grad(
            &what("layers.1.out_proj"),
            layers[1].self_attn.out_proj.weight.val().grad(&grads),
            &gr["transformer_encoder.layers.1.self_attn.out_proj.weight"],
            true,
        );
        assert_grad(
            &what("layers.0.linear1"),
            layers[0].linear1.weight.val().grad(&grads),
            &gr["transformer_encoder.layers.0.linear1.weight"],
            true,
        );
        assert_grad(
            &what("layers.1.norm1"),
            layers[1].norm1.gamma.val().grad(&grads),
            &gr["transformer_encoder.layers.1.norm1.weight"],
            false,
        );
        assert_grad(&what("decoder.fc.4"), model.decoder.fc[2].weight.val().grad(&grads), &gr["decoder.fc.4.weight"], true);
        let mvc = model.mvc_decoder.as_ref().unwrap();
        assert_grad(&what("mvc_decoder.W"), mvc.W.weight.val().grad(&grads), &gr["mvc_decoder.W.weight"], true);
        assert_grad(&what("mvc_decoder.gene2query"), mvc.gene2query.weight.val().grad(&grads), &gr["mvc_decoder.gene2query.weight"], true);
    }
}
