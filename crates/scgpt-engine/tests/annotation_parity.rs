//! The annotation fine-tuning loss and its gradients against the original scGPT
//! (`tests/data/engine/annotation_grad.*`, from `tests/gen/engine/gen_annotation_grad.py`:
//! PyPI scgpt 0.2.4 `TransformerModel` with its CLS head, PyTorch on CPU, dropout 0, train
//! mode, `nn.CrossEntropyLoss()(cls_output, labels)`). The engine's own entry points are used:
//! a `ClassifyBatch` as the collator hands it over, `annotation::mean_loss` and
//! `Annotation::logits`.

use scgpt_engine::collate::ClassifyBatch;
use scgpt_engine::tasks::annotation::{mean_loss, Annotation};
use scgpt_model::burn::tensor::{Device, Tensor};
use scgpt_model::layers::{HeadLayer, ValueEncoder};
use scgpt_model::{load_pretrained, ModelConfig};
use serde_json::Value;

#[path = "common/fixture.rs"]
mod fixture;
use fixture::{bools, data_dir, floats, ints, shape_of};

const NTOKEN: usize = 100;
const PAD_ID: usize = 97;
const N_CLS: usize = 5;

/// Gradients differ from PyTorch's only by summation order; relative to the largest entry of
/// the tensor, so tiny entries of a large gradient are not held to a tighter bound. burn's
/// Linear weights are `[in, out]`, PyTorch's `[out, in]`: `transpose` for those.
fn assert_grad<const D: usize>(what: &str, got: Option<Tensor<D>>, want: &Value, transpose: bool) {
    let got = got.unwrap_or_else(|| panic!("{what}: no gradient"));
    let got: Tensor<D> = if transpose { got.swap_dims(0, 1) } else { got };
    assert_eq!(got.dims().to_vec(), shape_of(want), "{what}: shape");
    let got: Vec<f32> = got.into_data().convert::<f32>().try_into_vec().unwrap();
    let want = floats(want);
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-6);
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / scale).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: worst error {worst:.2e} of max |grad| {scale:.3e}");
}

#[test]
fn annotation_loss_and_gradients_match_pytorch() {
    let dir = data_dir();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("annotation_grad.json")).unwrap()).unwrap();
    assert_eq!(json["ntoken"].as_u64(), Some(NTOKEN as u64));
    assert_eq!(json["pad_token_id"].as_u64(), Some(PAD_ID as u64));
    assert_eq!(json["n_cls"].as_u64(), Some(N_CLS as u64));

    // The pretrained args.json has no n_cls: the fine-tuning run sets it from its labels.
    let mut config = ModelConfig::from_args_json(dir.join("annotation_grad.args.json"), NTOKEN).unwrap().with_pad_token_id(PAD_ID);
    config.n_cls = N_CLS;
    assert_eq!(config.nlayers_cls, 3, "n_layers_cls from args.json");
    config.dropout = 0.0;
    let device = Device::flex().autodiff();
    let mut model = config.init(&device).unwrap();
    load_pretrained(&mut model, dir.join("annotation_grad.pt")).unwrap();

    let inp = &json["inputs"];
    let [b, l] = shape_of(&inp["src"])[..] else { panic!("src is not 2-D") };
    let batch = ClassifyBatch {
        batch: b,
        len: l,
        genes: inp["src"]["data"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect(),
        values: floats(&inp["values"]),
        pad: bools(&inp["src_key_padding_mask"]),
        labels: ints(&inp["labels"]),
    };
    assert_eq!(batch.labels.len(), b);
    assert!(batch.pad.iter().any(|&p| p), "the fixture has padded cells");

    // Logits of the CLS head.
    let logits = Annotation::logits(&model, &batch, &device).unwrap();
    assert_eq!(logits.dims().to_vec(), shape_of(&json["logits"]), "logits: shape");
    let got: Vec<f32> = logits.into_data().convert::<f32>().try_into_vec().unwrap();
    for (i, (g, w)) in got.iter().zip(floats(&json["logits"])).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "logits[{i}]: {g} vs {w}");
    }

    // The task's loss: mean cross entropy over the cells, no class weights.
    let loss = mean_loss(&model, &batch, None, &device).unwrap();
    let want = json["loss"].as_f64().unwrap() as f32;
    let got = loss.clone().into_scalar::<f32>();
    assert!((got - want).abs() <= 1e-5 * want.abs(), "loss {got} vs {want}");

    let grads = loss.backward();
    let g = &json["grads"];

    // cls_decoder: PyTorch `_decoder` indices 0/3 (Linear), 2/5 (LayerNorm) are Vec entries
    // 0/2 and 1/3 (the ReLUs hold no parameters).
    let head = &model.cls_decoder;
    assert_eq!(head._decoder.len(), 4);
    for (i, layer) in head._decoder.iter().enumerate() {
        let torch_index = [0, 2, 3, 5][i];
        let name = |p: &str| format!("cls_decoder._decoder.{torch_index}.{p}");
        match layer {
            HeadLayer::Linear(lin) => {
                assert_grad(&name("weight"), lin.weight.val().grad(&grads), &g[name("weight")], true);
                assert_grad(&name("bias"), lin.bias.as_ref().unwrap().val().grad(&grads), &g[name("bias")], false);
            }
            HeadLayer::Norm(norm) => {
                assert_grad(&name("weight"), norm.gamma.val().grad(&grads), &g[name("weight")], false);
                assert_grad(&name("bias"), norm.beta.as_ref().unwrap().val().grad(&grads), &g[name("bias")], false);
            }
        }
    }
    assert_grad("cls_decoder.out_layer.weight", head.out_layer.weight.val().grad(&grads), &g["cls_decoder.out_layer.weight"], true);
    assert_grad(
        "cls_decoder.out_layer.bias",
        head.out_layer.bias.as_ref().unwrap().val().grad(&grads),
        &g["cls_decoder.out_layer.bias"],
        false,
    );

    let layers = &model.transformer_encoder.layers;
    assert_grad(
        "layers.1.linear2.weight",
        layers[1].linear2.weight.val().grad(&grads),
        &g["transformer_encoder.layers.1.linear2.weight"],
        true,
    );
    assert_grad(
        "layers.0.Wqkv.weight",
        layers[0].self_attn.Wqkv.weight.val().grad(&grads),
        &g["transformer_encoder.layers.0.self_attn.in_proj_weight"],
        true,
    );
    assert_grad("encoder.embedding.weight", model.encoder.embedding.weight.val().grad(&grads), &g["encoder.embedding.weight"], false);
    let Some(ValueEncoder::Continuous(ve)) = model.value_encoder.as_ref() else { panic!("a continuous value encoder") };
    assert_grad("value_encoder.linear1.weight", ve.linear1.weight.val().grad(&grads), &g["value_encoder.linear1.weight"], true);

    // padding_idx: the <pad> row gets exactly no gradient although <pad> tokens are embedded.
    let emb = model.encoder.embedding.weight.val().grad(&grads).unwrap();
    let d = emb.dims()[1];
    let pad_row: Vec<f32> = emb.slice([PAD_ID..PAD_ID + 1, 0..d]).into_data().convert::<f32>().try_into_vec().unwrap();
    assert!(pad_row.iter().all(|&x| x == 0.0), "the <pad> row has a gradient");
}
