//! The perturbation fine-tuning loss, its gradients and `pred_perturb` against the original
//! scGPT (`tests/data/engine/perturbation_grad.*`, from
//! `/work/venv-torch/bin/python tests/gen/engine/gen_perturbation_grad.py`: PyPI scgpt 0.2.4
//! `TransformerGenerator` with Tutorial_Perturbation's settings — dropout 0, `pad_value` 0,
//! `pert_pad_id` 0, no MVC, no zero probabilities, cls cell embedding — every parameter
//! randomised, PyTorch on CPU). One train-mode step of the tutorial's loop on 4 cells × 24
//! genes (4 genes outside the vocabulary fed as `<pad>`, unmasked): `masked_mse_loss` with every
//! position selected, i.e. the mean squared error; then `pred_perturb(include_zero_gene="all")`
//! in eval mode on 3 more cells. The engine's own entry points are used: a `PerturbBatch` as the
//! task's collator builds it and `perturbation::mse_loss`.

use scgpt_engine::tasks::perturbation::{mse_loss, PerturbBatch, PERTURBED_FLAG};
use scgpt_engine::tasks::LossContext;
use scgpt_model::burn::module::Module;
use scgpt_model::burn::tensor::{Device, Int, Tensor, TensorData};
use scgpt_model::{CellEmbStyle, ForwardFlags, IncludeZeroGene, PerturbationConfig, TransformerGenerator};
use serde_json::Value;

#[path = "common/fixture.rs"]
mod fixture;
use fixture::{bools, data_dir, floats, ints, shape_of};

const NTOKEN: usize = 100;
const PAD_ID: usize = 97;
/// The tutorial's `pert_pad_id`: the "not perturbed" flag.
const PERT_PAD_ID: usize = 0;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn int_data(v: &Value) -> Vec<i64> {
    ints(&v["data"])
}

/// Gradients differ from PyTorch's only by summation order; relative to the largest entry of
/// the tensor. burn's Linear weights are `[in, out]`, PyTorch's `[out, in]`: `transpose` for
/// those. Returns the gradient (in PyTorch's layout) for further checks.
fn assert_grad<const D: usize>(what: &str, got: Option<Tensor<D>>, want: &Value, transpose: bool) -> Vec<f32> {
    let got = got.unwrap_or_else(|| panic!("{what}: no gradient"));
    let got: Tensor<D> = if transpose { got.swap_dims(0, 1) } else { got };
    assert_eq!(got.dims().to_vec(), shape_of(want), "{what}: shape");
    let got = host(got);
    let want = floats(want);
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-6);
    let max_abs = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    let worst = max_abs / scale;
    eprintln!("  grad {what:<52} max|grad| {scale:.3e}  max abs {max_abs:.2e}  rel {worst:.2e}");
    assert!(worst <= 1e-4, "{what}: worst error {worst:.2e} of max |grad| {scale:.3e}");
    got
}

/// Element-wise |got − want| ≤ tol · max(1, |want|); returns the worst such error.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err.is_finite(), "{what}[{i}]: got {g}, want {w}");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("  {what:<57} worst err {:.2e}", worst.0);
    assert!(worst.0 <= tol, "{what}: element {} got {} want {} (err {:.3e})", worst.1, got[worst.1], want[worst.1], worst.0);
    worst.0
}

/// The original constructor's arguments as the fixture records them.
fn config(json: &Value) -> PerturbationConfig {
    let c = &json["ctor"];
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let mut cfg = PerturbationConfig::new(json["ntoken"].as_u64().unwrap() as usize, u("d_model"), u("nhead"), u("d_hid"), u("nlayers"))
        .with_pad_token_id(json["pad_token_id"].as_u64().unwrap() as usize);
    cfg.nlayers_cls = u("nlayers_cls");
    cfg.n_cls = u("n_cls");
    cfg.dropout = c["dropout"].as_f64().unwrap();
    cfg.pad_value = c["pad_value"].as_f64().unwrap();
    cfg.pert_pad_id = u("pert_pad_id");
    cfg.do_mvc = c["do_mvc"].as_bool().unwrap();
    cfg.explicit_zero_prob = c["explicit_zero_prob"].as_bool().unwrap();
    assert_eq!(c["cell_emb_style"].as_str(), Some("cls"));
    cfg.cell_emb_style = CellEmbStyle::Cls;
    // The tutorial's settings, as the fixture's constructor used them.
    assert_eq!(cfg.dropout, 0.0);
    assert_eq!(cfg.pert_pad_id, PERT_PAD_ID);
    assert!(!cfg.do_mvc && !cfg.explicit_zero_prob);
    cfg
}

fn load(json: &Value, device: &Device) -> TransformerGenerator {
    let mut model = config(json).init(device).unwrap();
    let file = json["checkpoint"]["file"].as_str().unwrap();
    let report = model.load_checkpoint(data_dir().join(file)).unwrap();
    assert!(report.missing.is_empty(), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    assert_eq!(report.loaded.len(), json["checkpoint"]["keys"].as_u64().unwrap() as usize);
    model
}

fn fixture() -> Value {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(data_dir().join("perturbation_grad.json")).unwrap()).unwrap();
    assert_eq!(json["ntoken"].as_u64(), Some(NTOKEN as u64));
    assert_eq!(json["pad_token_id"].as_u64(), Some(PAD_ID as u64));
    json
}

/// The training batch as the task's collator hands it over: every gene, `<pad>` for the genes
/// outside the vocabulary, the control cell as input, the perturbed cell as target.
fn train_batch(json: &Value) -> PerturbBatch {
    let inp = &json["step"]["inputs"];
    let [b, l] = shape_of(&inp["src"])[..] else { panic!("src is not 2-D") };
    assert!(bools(&inp["src_key_padding_mask"]).iter().all(|p| !p), "the tutorial masks nothing");
    let batch = PerturbBatch {
        b,
        l,
        ids: int_data(&inp["src"]),
        values: floats(&inp["values"]),
        target: floats(&inp["target"]),
        flags: int_data(&inp["input_pert_flags"]),
        conditions: vec!["cond".into(); b],
    };
    // The fixture's gene ids per row, the collator's layout.
    let gene_ids = ints(&json["gene_ids"]);
    for r in 0..b {
        assert_eq!(&batch.ids[r * l..(r + 1) * l], &gene_ids[..]);
    }
    for (r, genes) in json["step"]["perturbed"].as_array().unwrap().iter().enumerate() {
        for g in ints(genes) {
            assert_eq!(batch.flags[r * l + g as usize], PERTURBED_FLAG);
        }
    }
    batch
}

#[test]
fn perturbation_loss_gradients_and_pred_perturb_match_pytorch() {
    let json = fixture();
    let step = &json["step"];
    let gene_ids = ints(&json["gene_ids"]);
    let outside = ints(&json["outside_vocab"]);
    assert!(outside.iter().all(|&g| gene_ids[g as usize] == PAD_ID as i64));

    // Training mode: an autodiff device with the modules' training flags on (their default).
    let device = Device::flex().autodiff();
    let model = load(&json, &device);
    assert!(model.is_training());
    let batch = train_batch(&json);
    let (b, l) = (batch.b, batch.l);
    eprintln!("train step ({b} × {l}, {} genes outside the vocabulary):", outside.len());

    let mut single = scgpt_dist::Single::new();
    let mut ctx = LossContext { device: &device, comm: &mut single, per_unit: 1.0 / (b * l) as f64, per_batch: 1.0 };
    let loss = mse_loss(&model, &batch, &mut ctx).unwrap();
    assert_eq!(loss.terms.len(), 1);
    let want = step["loss"].as_f64().unwrap() as f32;
    let sum = loss.terms[0].clone().expect("the mse term").into_scalar::<f32>();
    let total = loss.total.clone().into_scalar::<f32>();
    for (what, got) in [("total loss", total), ("Σ squared error / (b·l)", sum / (b * l) as f32)] {
        let rel = (got - want).abs() / want.abs();
        eprintln!("  {what:<40} {got:>12.7} vs {want:>12.7}  rel {rel:.2e}");
        assert!(rel <= 1e-5, "{what}: {got} vs {want}");
    }
    // The prediction itself (train mode, dropout 0).
    let out = model.forward(batch.input(&device), ForwardFlags::default()).unwrap();
    assert_close("mlm_output (train mode)", &host(out.mlm_output), &floats(&step["mlm_output"]), 1e-5);

    let grads = loss.total.backward();
    let g = &step["grads"];
    let emb =
        assert_grad("encoder.embedding.weight", model.encoder.embedding.weight.val().grad(&grads), &g["encoder.embedding.weight"], false);
    // padding_idx: the <pad> row gets exactly no gradient although 4 genes per row are <pad>.
    let d = shape_of(&g["encoder.embedding.weight"])[1];
    assert!(emb[PAD_ID * d..(PAD_ID + 1) * d].iter().all(|&x| x == 0.0), "the <pad> row of the gene embedding has a gradient");
    assert_grad("encoder.enc_norm.weight", model.encoder.enc_norm.gamma.val().grad(&grads), &g["encoder.enc_norm.weight"], false);
    let ve = &model.value_encoder;
    assert_grad("value_encoder.linear1.weight", ve.linear1.weight.val().grad(&grads), &g["value_encoder.linear1.weight"], true);
    assert_grad("value_encoder.linear2.weight", ve.linear2.weight.val().grad(&grads), &g["value_encoder.linear2.weight"], true);
    assert_grad("value_encoder.norm.weight", ve.norm.gamma.val().grad(&grads), &g["value_encoder.norm.weight"], false);
    let pert = assert_grad("pert_encoder.weight", model.pert_encoder.weight.val().grad(&grads), &g["pert_encoder.weight"], false);
    // padding_idx = pert_pad_id 0: the "not perturbed" row (nonzero here, so it does shift
    // every input) gets no gradient; the "perturbed" row does.
    assert!(pert[PERT_PAD_ID * d..(PERT_PAD_ID + 1) * d].iter().all(|&x| x == 0.0), "the pert_pad_id row of pert_encoder has a gradient");
    let row1 = PERTURBED_FLAG as usize;
    assert!(pert[row1 * d..(row1 + 1) * d].iter().any(|&x| x != 0.0));
    assert!(
        host(model.pert_encoder.weight.val().slice([0..1, 0..d])).iter().any(|&x| x != 0.0),
        "the fixture's pert_pad_id row is randomised (nonzero)"
    );

    let layers = &model.transformer_encoder.layers;
    assert_grad(
        "layers.0.Wqkv.weight (in_proj_weight)",
        layers[0].self_attn.Wqkv.weight.val().grad(&grads),
        &g["transformer_encoder.layers.0.self_attn.in_proj_weight"],
        true,
    );
    assert_grad(
        "layers.1.linear2.weight",
        layers[1].linear2.weight.val().grad(&grads),
        &g["transformer_encoder.layers.1.linear2.weight"],
        true,
    );

    // AffineExprDecoder: each ExprDecoder's PyTorch Sequential indices 0/2/4 (Linear) are Vec
    // entries 0/1/2.
    for (name, dec) in [("coeff_decoder", &model.decoder.coeff_decoder), ("bias_decoder", &model.decoder.bias_decoder)] {
        assert_grad(
            &format!("decoder.{name}.fc.0.weight"),
            dec.fc[0].weight.val().grad(&grads),
            &g[&format!("decoder.{name}.fc.0.weight")],
            true,
        );
        assert_grad(
            &format!("decoder.{name}.fc.4.weight"),
            dec.fc[2].weight.val().grad(&grads),
            &g[&format!("decoder.{name}.fc.4.weight")],
            true,
        );
        assert_grad(
            &format!("decoder.{name}.fc.4.bias"),
            dec.fc[2].bias.as_ref().unwrap().val().grad(&grads),
            &g[&format!("decoder.{name}.fc.4.bias")],
            false,
        );
    }

    // pred_perturb in eval mode (the original calls self.eval() first), with the same
    // parameters: no optimiser step was taken.
    let eval = model.valid();
    assert!(!eval.is_training());
    let ed = eval.device();
    let pp = &json["pred_perturb"];
    assert_eq!(pp["include_zero_gene"].as_str(), Some("all"));
    let [pb, pg] = shape_of(&pp["inputs"]["values"])[..] else { panic!("values is not 2-D") };
    assert_eq!(pg, gene_ids.len());
    let values = floats(&pp["inputs"]["values"]);
    let flags = int_data(&pp["inputs"]["pert_flags"]);
    let want = floats(&pp["output"]);
    eprintln!("pred_perturb ({pb} × {pg}, eval mode):");
    let got = eval
        .pred_perturb(
            Tensor::<2>::from_data(TensorData::new(values.clone(), [pb, pg]), &ed),
            Tensor::<2, Int>::from_data(TensorData::new(flags.clone(), [pb, pg]), &ed),
            &gene_ids,
            IncludeZeroGene::All,
        )
        .unwrap();
    assert_eq!(got.dims(), [pb, pg]);
    assert_close("pred_perturb(\"all\")", &host(got), &want, 1e-5);

    // The task's validation path (eval_batch): the collated batch through the eval forward,
    // its unsampled `mlm_pred`, over every gene.
    let vb = PerturbBatch {
        b: pb,
        l: pg,
        ids: (0..pb).flat_map(|_| gene_ids.iter().copied()).collect(),
        values,
        target: vec![0.0; pb * pg],
        flags,
        conditions: vec!["cond".into(); pb],
    };
    let out = eval.forward(vb.input(&ed), ForwardFlags::default()).unwrap();
    assert_close("eval forward of a PerturbBatch (mlm_pred)", &host(out.mlm_pred), &want, 1e-5);
}
