//! Training-mode behaviour against PyTorch (`tests/data/model/training.json`): gradients of a
//! GEP + GEPC + ECS loss through the whole model (dropout 0 on both sides so the runs are
//! deterministic), and one training step of the affine-free BatchNorm1d used by DSBN.

use scgpt_model::burn::module::RunningState;
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::layers::BatchNorm1d;
use scgpt_model::loss::masked_mse_loss;
use scgpt_model::{load_pretrained, ForwardFlags, ModelConfig, ModelInput};
use serde_json::Value;

mod common;
use common::{assert_grad, bools, data_dir, floats, shape_of};
fn tensor<const D: usize>(v: &Value, device: &Device) -> Tensor<D> {
    let s: [usize; D] = shape_of(v).try_into().unwrap();
    Tensor::from_data(TensorData::new(floats(v), s), device)
}

#[test]
fn gradients_match_pytorch() {
    let dir = data_dir();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
    let mut config = ModelConfig::from_args_json(dir.join("continuous.args.json"), 100).unwrap().with_pad_token_id(97);
    config.dropout = 0.0;
    let device = Device::flex().autodiff();
    let mut model = config.init(&device).unwrap();
    load_pretrained(&mut model, dir.join("continuous.pt")).unwrap();

    let inp = &json["inputs"];
    let [b, l] = shape_of(&inp["src"])[..] else { panic!() };
    let src: Vec<i64> = inp["src"]["data"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let input = ModelInput {
        src: Tensor::<2, Int>::from_data(TensorData::new(src, [b, l]), &device),
        values: tensor(&inp["values"], &device),
        src_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(bools(&inp["src_key_padding_mask"]), [b, l]), &device),
        batch_labels: None,
    };
    let target: Tensor<2> = tensor(&inp["target"], &device);
    let m = Tensor::<2, Bool>::from_data(TensorData::new(bools(&inp["loss_mask"]), [b, l]), &device);
    let out = model.forward(input, ForwardFlags { mvc: true, ecs: true, ..Default::default() }).unwrap();
    let masked_mse = |pred: Tensor<2>| masked_mse_loss(pred, target.clone(), m.clone());
    let loss = masked_mse(out.mlm_output) + masked_mse(out.mvc_output.unwrap()) + out.loss_ecs.unwrap().mul_scalar(10.0);
    let want = json["loss"].as_f64().unwrap() as f32;
    let got = loss.clone().into_scalar::<f32>();
    assert!((got - want).abs() <= 1e-4 * want.abs(), "loss {got} vs {want}");

    let grads = loss.backward();
    let g = &json["grads"];
    let layers = &model.transformer_encoder.layers;
    assert_grad("embedding", model.encoder.embedding.weight.val().grad(&grads), &g["encoder.embedding.weight"], false);
    assert_grad("enc_norm.weight", model.encoder.enc_norm.gamma.val().grad(&grads), &g["encoder.enc_norm.weight"], false);
    let scgpt_model::layers::ValueEncoder::Continuous(ve) = model.value_encoder.as_ref().unwrap() else { panic!() };
    assert_grad("value_encoder.linear1.weight", ve.linear1.weight.val().grad(&grads), &g["value_encoder.linear1.weight"], true);
    assert_grad(
        "value_encoder.linear1.bias",
        ve.linear1.bias.as_ref().unwrap().val().grad(&grads),
        &g["value_encoder.linear1.bias"],
        false,
    );
    assert_grad("value_encoder.norm.bias", ve.norm.beta.as_ref().unwrap().val().grad(&grads), &g["value_encoder.norm.bias"], false);
    assert_grad(
        "layers.0.Wqkv.bias",
        layers[0].self_attn.Wqkv.bias.as_ref().unwrap().val().grad(&grads),
        &g["transformer_encoder.layers.0.self_attn.in_proj_bias"],
        false,
    );
    assert_grad(
        "layers.1.Wqkv.weight",
        layers[1].self_attn.Wqkv.weight.val().grad(&grads),
        &g["transformer_encoder.layers.1.self_attn.in_proj_weight"],
        true,
    );
    assert_grad(
        "layers.1.out_proj.weight",
        layers[1].self_attn.out_proj.weight.val().grad(&grads),
        &g["transformer_encoder.layers.1.self_attn.out_proj.weight"],
        true,
    );
    assert_grad(
        "layers.0.linear1.weight",
        layers[0].linear1.weight.val().grad(&grads),
        &g["transformer_encoder.layers.0.linear1.weight"],
        true,
    );
    assert_grad("layers.1.norm2.weight", layers[1].norm2.gamma.val().grad(&grads), &g["transformer_encoder.layers.1.norm2.weight"], false);
    assert_grad("decoder.fc.4.weight", model.decoder.fc[2].weight.val().grad(&grads), &g["decoder.fc.4.weight"], true);
    let mvc = model.mvc_decoder.as_ref().unwrap();
    assert_grad("mvc_decoder.W.weight", mvc.W.weight.val().grad(&grads), &g["mvc_decoder.W.weight"], true);
    assert_grad(
        "mvc_decoder.gene2query.bias",
        mvc.gene2query.bias.as_ref().unwrap().val().grad(&grads),
        &g["mvc_decoder.gene2query.bias"],
        false,
    );

    // padding_idx: the <pad> row gets exactly no gradient although <pad> tokens are embedded.
    let emb = model.encoder.embedding.weight.val().grad(&grads).unwrap();
    let pad_row: Vec<f32> = emb.slice([97..98, 0..32]).into_data().convert::<f32>().try_into_vec().unwrap();
    assert!(pad_row.iter().all(|&x| x == 0.0));
}

#[test]
fn batch_norm_training_step_matches_pytorch() {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(data_dir().join("training.json")).unwrap()).unwrap();
    let bn_ref = &json["batch_norm"];
    let device = Device::flex().autodiff();
    let mut bn = BatchNorm1d::new(6, false, &device);
    bn.running_mean = RunningState::new(tensor(&bn_ref["running_mean_before"], &device));
    bn.running_var = RunningState::new(tensor(&bn_ref["running_var_before"], &device));
    assert!(bn.weight.is_none() && bn.bias.is_none());
    let x: Tensor<3> = tensor(&bn_ref["x"], &device).require_grad();
    let y = bn.forward(x);
    let close = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: {g} vs {w}");
        }
    };
    close("y", y.into_data().convert::<f32>().try_into_vec().unwrap(), floats(&bn_ref["y"]));
    close(
        "running_mean",
        bn.running_mean.value_sync().into_data().convert::<f32>().try_into_vec().unwrap(),
        floats(&bn_ref["running_mean_after"]),
    );
    close(
        "running_var (unbiased update)",
        bn.running_var.value_sync().into_data().convert::<f32>().try_into_vec().unwrap(),
        floats(&bn_ref["running_var_after"]),
    );
}

#[test]
fn padding_idx_blocks_the_pad_row_gradient() {
    // A loss that reads the padded positions (MVC over every position): the <pad> embedding
    // row must still get no gradient, as nn.Embedding(padding_idx=...) guarantees.
    let dir = data_dir();
    let config = ModelConfig::from_args_json(dir.join("continuous.args.json"), 100).unwrap().with_pad_token_id(97);
    let device = Device::flex().autodiff();
    let mut model = config.init(&device).unwrap();
    load_pretrained(&mut model, dir.join("continuous.pt")).unwrap();
    let src = Tensor::<2, Int>::from_data(TensorData::new(vec![98i64, 5, 7, 97, 97, 98, 9, 97, 97, 97], [2, 5]), &device);
    let pads = src.clone().equal_elem(97);
    let values = Tensor::<2>::from_data(TensorData::new(vec![-2f32, 3., 9., -2., -2., -2., 40., -2., -2., -2.], [2, 5]), &device);
    let out = model
        .forward(
            ModelInput { src, values, src_key_padding_mask: pads, batch_labels: None },
            ForwardFlags { mvc: true, ..Default::default() },
        )
        .unwrap();
    let grads = out.mvc_output.unwrap().sum().backward();
    let emb = model.encoder.embedding.weight.val().grad(&grads).unwrap();
    let row = |i: usize| -> Vec<f32> { emb.clone().slice([i..i + 1, 0..32]).into_data().convert::<f32>().try_into_vec().unwrap() };
    assert!(row(97).iter().all(|&x| x == 0.0), "pad row has a gradient");
    assert!(row(5).iter().any(|&x| x != 0.0) && row(98).iter().any(|&x| x != 0.0));
}

#[test]
fn losses_match_scgpt_loss_py() {
    use scgpt_model::loss::{criterion_neg_log_bernoulli, masked_relative_error};
    let json: Value = serde_json::from_str(&std::fs::read_to_string(data_dir().join("training.json")).unwrap()).unwrap();
    let l = &json["losses"];
    let device = Device::flex();
    let pred: Tensor<2> = tensor(&l["pred"], &device);
    let target: Tensor<2> = tensor(&l["target"], &device);
    let probs: Tensor<2> = tensor(&l["probs"], &device);
    let dims: [usize; 2] = shape_of(&l["pred"]).try_into().unwrap();
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(bools(&l["mask"]), dims), &device);
    let check = |what: &str, got: Tensor<1>| {
        let got = got.into_scalar::<f32>();
        let want = l[what].as_f64().unwrap() as f32;
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: {got} vs {want}");
    };
    check("masked_mse_loss", masked_mse_loss(pred.clone(), target.clone(), mask.clone()));
    check("criterion_neg_log_bernoulli", criterion_neg_log_bernoulli(probs, target.clone(), mask.clone()));
    check("masked_relative_error", masked_relative_error(pred, target, mask));
}
