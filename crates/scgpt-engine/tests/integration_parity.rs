//! The integration fine-tuning loss, its terms and its gradients against the original scGPT
//! (`tests/data/engine/integration_grad.*`, from `tests/gen/engine/gen_integration_grad.py`:
//! PyPI scgpt 0.2.4 `TransformerModel` with Tutorial_Integration's heads — GEPC, explicit zero
//! probabilities, ECS 0.8, DAB, batch labels in the decoders, DSBN — PyTorch on CPU, dropout 0,
//! train mode, the tutorial's per-batch loss). Two single-domain minibatches (domain 1
//! unpadded as `include_zero_gene` gives it, domain 2 padded) run through the same model, so
//! DSBN normalises each with the batch statistics of its own `bns[k]`. The engine's own entry
//! point is used: a `MaskedBatch` as the collator hands it over and `Integration::mean_loss`.

use scgpt_engine::collate::MlmBatch;
use scgpt_engine::tasks::expression::MaskedBatch;
use scgpt_engine::tasks::integration::Integration;
use scgpt_model::burn::tensor::{Device, Tensor};
use scgpt_model::layers::{HeadLayer, ValueEncoder};
use scgpt_model::{load_pretrained, BatchNormStyle, CellEmbStyle, ModelConfig};
use serde_json::Value;

#[path = "common/fixture.rs"]
mod fixture;
use fixture::{bools, data_dir, floats, ints, shape_of};

const NTOKEN: usize = 100;
const PAD_ID: usize = 97;
const N_BATCHES: usize = 3;
/// `Loss.terms` order of the expression tasks.
const TERMS: [&str; 6] = ["gep", "gep_zero", "gepc", "gepc_zero", "ecs", "dar"];

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

/// A scalar against PyTorch's: relative error `tol`, with an absolute floor of `tol` when
/// `floor` (terms near or below 1).
fn assert_scalar(what: &str, got: f32, want: f32, tol: f32, floor: bool) {
    let diff = (got - want).abs();
    let scale = if floor { want.abs().max(1.0) } else { want.abs() };
    assert!(diff <= tol * scale, "{what}: {got} vs {want}");
    eprintln!("  {what:<48} {got:>14.7} vs {want:>14.7}  abs {diff:.2e} rel {:.2e}", diff / want.abs().max(f32::MIN_POSITIVE));
}

/// Gradients differ from PyTorch's only by summation order; relative to the largest entry of
/// the tensor, so tiny entries of a large gradient are not held to a tighter bound. burn's
/// Linear weights are `[in, out]`, PyTorch's `[out, in]`: `transpose` for those.
fn assert_grad<const D: usize>(what: &str, got: Option<Tensor<D>>, want: &Value, transpose: bool) {
    let got = got.unwrap_or_else(|| panic!("{what}: no gradient"));
    let got: Tensor<D> = if transpose { got.swap_dims(0, 1) } else { got };
    assert_eq!(got.dims().to_vec(), shape_of(want), "{what}: shape");
    let got = host(got);
    let want = floats(want);
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-6);
    let max_abs = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    let worst = max_abs / scale;
    eprintln!("  grad {what:<43} max|grad| {scale:.3e}  max abs {max_abs:.2e}  rel {worst:.2e}");
    assert!(worst <= 1e-4, "{what}: worst error {worst:.2e} of max |grad| {scale:.3e}");
}

#[test]
fn integration_loss_terms_and_gradients_match_pytorch() {
    let dir = data_dir();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("integration_grad.json")).unwrap()).unwrap();
    assert_eq!(json["ntoken"].as_u64(), Some(NTOKEN as u64));
    assert_eq!(json["pad_token_id"].as_u64(), Some(PAD_ID as u64));
    assert_eq!(json["num_batch_labels"].as_u64(), Some(N_BATCHES as u64));
    let mask_ratio = json["mask_ratio"].as_f64().unwrap();
    let ecs_weight = json["ecs_weight"].as_f64().unwrap();
    let dab_weight = json["dab_weight"].as_f64().unwrap();

    // The pretrained args.json; the tutorial builds its model from its own flags, as the
    // engine's `init::apply_objective` does for the expression tasks.
    let mut config = ModelConfig::from_args_json(dir.join("integration_grad.args.json"), NTOKEN).unwrap().with_pad_token_id(PAD_ID);
    assert!(config.do_mvc, "MVC from args.json");
    config.do_dab = true;
    config.use_batch_labels = true;
    config.num_batch_labels = Some(N_BATCHES);
    config.domain_spec_batchnorm = BatchNormStyle::Dsbn;
    config.ecs_threshold = json["ecs_threshold"].as_f64().unwrap();
    config.explicit_zero_prob = true;
    config.cell_emb_style = CellEmbStyle::Cls;
    config.dropout = 0.0;
    // Training mode: an autodiff device with the modules' training flags on (their default),
    // so DSBN normalises with the minibatch's statistics and updates its running ones.
    let device = Device::flex().autodiff();
    let mut model = config.init(&device).unwrap();
    load_pretrained(&mut model, dir.join("integration_grad.pt")).unwrap();
    let dsbn = model.dsbn.as_ref().expect("a DSBN model");
    assert_eq!(dsbn.bns.len(), N_BATCHES);
    assert!(dsbn.bns.iter().all(|bn| bn.weight.is_none() && bn.bias.is_none()), "DSBN is affine-free");
    let task = Integration::with(mask_ratio, true, true, ecs_weight, dab_weight);

    for step in json["steps"].as_array().unwrap() {
        let name = step["name"].as_str().unwrap();
        let inp = &step["inputs"];
        let [b, l] = shape_of(&inp["src"])[..] else { panic!("src is not 2-D") };
        let ids = ints(&inp["batch_labels"]);
        let domain = step["domain"].as_i64().unwrap();
        assert!(ids.iter().all(|&i| i == domain), "a single-domain minibatch");
        let batch = MaskedBatch(
            MlmBatch {
                batch: b,
                len: l,
                genes: ints(&inp["src"]["data"]),
                values: floats(&inp["values"]),
                target: floats(&inp["target"]),
                pad: bools(&inp["src_key_padding_mask"]),
                masked: bools(&inp["masked"]),
                labels: Vec::new(),
            },
            Some(ids),
        );
        let count = step["masked_count"].as_u64().unwrap() as usize;
        assert_eq!(batch.0.masked_tokens(), count);
        // The masks are random_mask_value's: exactly the input positions holding −1.
        for (i, (&m, &v)) in batch.0.masked.iter().zip(&batch.0.values).enumerate() {
            assert_eq!(m, v == -1.0, "step {name}: mask at {i}");
        }
        eprintln!("step {name} (domain {domain}, {b} × {l}, {count} masked):");

        let loss = task.mean_loss(&model, &batch, &device).unwrap();
        assert_eq!(loss.terms.len(), TERMS.len());
        for (i, term) in TERMS.iter().enumerate() {
            let raw = loss.terms[i].clone().unwrap_or_else(|| panic!("step {name}: no {term} term")).into_scalar::<f32>();
            // The expression terms are sums over the masked positions; PyTorch's are means.
            let got = if i < 4 { raw / count as f32 } else { raw };
            let want = step["terms"][term].as_f64().unwrap() as f32;
            assert_scalar(term, got, want, 1e-5, true);
        }
        let want = step["loss"].as_f64().unwrap() as f32;
        let got = loss.total.clone().into_scalar::<f32>();
        assert_scalar("total loss", got, want, 1e-5, false);

        let grads = loss.total.backward();
        let g = &step["grads"];
        let has = |k: &str| !g[k].is_null();

        let emb = model.encoder.embedding.weight.val().grad(&grads);
        assert_grad("encoder.embedding.weight", emb.clone(), &g["encoder.embedding.weight"], false);
        // padding_idx: the <pad> row gets exactly no gradient although <pad> is embedded.
        let emb = emb.unwrap();
        let d = emb.dims()[1];
        assert!(host(emb.slice([PAD_ID..PAD_ID + 1, 0..d])).iter().all(|&x| x == 0.0), "step {name}: the <pad> row has a gradient");
        assert_grad("encoder.enc_norm.weight", model.encoder.enc_norm.gamma.val().grad(&grads), &g["encoder.enc_norm.weight"], false);
        let Some(ValueEncoder::Continuous(ve)) = model.value_encoder.as_ref() else { panic!("a continuous value encoder") };
        assert_grad("value_encoder.linear1.weight", ve.linear1.weight.val().grad(&grads), &g["value_encoder.linear1.weight"], true);
        let be = model.batch_encoder.as_ref().expect("a batch encoder");
        assert_grad("batch_encoder.embedding.weight", be.embedding.weight.val().grad(&grads), &g["batch_encoder.embedding.weight"], false);
        assert_grad("batch_encoder.enc_norm.weight", be.enc_norm.gamma.val().grad(&grads), &g["batch_encoder.enc_norm.weight"], false);

        let layers = &model.transformer_encoder.layers;
        if has("transformer_encoder.layers.0.self_attn.in_proj_weight") {
            assert_grad(
                "layers.0.Wqkv.weight",
                layers[0].self_attn.Wqkv.weight.val().grad(&grads),
                &g["transformer_encoder.layers.0.self_attn.in_proj_weight"],
                true,
            );
        }
        assert_grad(
            "layers.1.linear2.weight",
            layers[1].linear2.weight.val().grad(&grads),
            &g["transformer_encoder.layers.1.linear2.weight"],
            true,
        );

        // ExprDecoder: PyTorch Sequential indices 0/2/4 (Linear) are Vec entries 0/1/2.
        let dec = &model.decoder;
        if has("decoder.fc.0.weight") {
            assert_grad("decoder.fc.0.weight", dec.fc[0].weight.val().grad(&grads), &g["decoder.fc.0.weight"], true);
        }
        assert_grad("decoder.fc.4.weight", dec.fc[2].weight.val().grad(&grads), &g["decoder.fc.4.weight"], true);
        let zl = dec.zero_logit.as_ref().expect("explicit zero probabilities");
        assert_grad("decoder.zero_logit.2.weight", zl[1].weight.val().grad(&grads), &g["decoder.zero_logit.2.weight"], true);
        assert_grad("decoder.zero_logit.4.weight", zl[2].weight.val().grad(&grads), &g["decoder.zero_logit.4.weight"], true);
        assert_grad("decoder.zero_logit.4.bias", zl[2].bias.as_ref().unwrap().val().grad(&grads), &g["decoder.zero_logit.4.bias"], false);

        let mvc = model.mvc_decoder.as_ref().expect("an MVC decoder");
        assert_grad("mvc_decoder.gene2query.weight", mvc.gene2query.weight.val().grad(&grads), &g["mvc_decoder.gene2query.weight"], true);
        assert_grad("mvc_decoder.W.weight", mvc.W.weight.val().grad(&grads), &g["mvc_decoder.W.weight"], true);
        if has("mvc_decoder.W_zero_logit.weight") {
            assert_grad(
                "mvc_decoder.W_zero_logit.weight",
                mvc.W_zero_logit.as_ref().unwrap().weight.val().grad(&grads),
                &g["mvc_decoder.W_zero_logit.weight"],
                true,
            );
        }

        // The discriminator: PyTorch `_decoder` indices 0/3 (Linear), 2/5 (LayerNorm) are Vec
        // entries 0/2 and 1/3 (the LeakyReLUs hold no parameters).
        let dab = model.grad_reverse_discriminator.as_ref().expect("a DAB discriminator");
        assert!(dab.reverse_grad);
        let HeadLayer::Linear(lin0) = &dab._decoder[0] else { panic!("_decoder.0 is a Linear") };
        assert_grad(
            "grad_reverse_discriminator._decoder.0.weight",
            lin0.weight.val().grad(&grads),
            &g["grad_reverse_discriminator._decoder.0.weight"],
            true,
        );
        let HeadLayer::Norm(norm2) = &dab._decoder[1] else { panic!("_decoder.2 is a LayerNorm") };
        assert_grad(
            "grad_reverse_discriminator._decoder.2.weight",
            norm2.gamma.val().grad(&grads),
            &g["grad_reverse_discriminator._decoder.2.weight"],
            false,
        );
        assert_grad(
            "grad_reverse_discriminator.out_layer.weight",
            dab.out_layer.weight.val().grad(&grads),
            &g["grad_reverse_discriminator.out_layer.weight"],
            true,
        );
        assert_grad(
            "grad_reverse_discriminator.out_layer.bias",
            dab.out_layer.bias.as_ref().unwrap().val().grad(&grads),
            &g["grad_reverse_discriminator.out_layer.bias"],
            false,
        );
    }

    // Each step updated the running statistics of its own domain only (unbiased variance,
    // momentum 0.1, padding positions included as in the original).
    let stats = &json["running_stats_after"];
    let dsbn = model.dsbn.as_ref().unwrap();
    for (key, want) in stats.as_object().unwrap() {
        let parts: Vec<&str> = key.split('.').collect();
        let domain: usize = parts[2].parse().unwrap();
        let bn = &dsbn.bns[domain];
        let got = match parts[3] {
            "running_mean" => host(bn.running_mean.value_sync()),
            "running_var" => host(bn.running_var.value_sync()),
            other => panic!("{other}"),
        };
        let want = floats(want);
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max);
        eprintln!("  {key:<48} max abs (|w| < 1) / rel diff {worst:.2e}");
        assert!(worst <= 1e-5, "{key}: worst error {worst:.2e}");
    }
}
