//! The integration task on the engine (the original's Tutorial_Integration objective): masked
//! values with GEPC, zero probabilities, ECS and DAR under DSBN, single-batch minibatches,
//! every term logged, a self-contained best_model/, exact resume; the DAR gradient reversal.

use std::path::Path;

use scgpt_engine::config::{resolve, TrainConfig};
use scgpt_engine::optim::{flatten_params, list_params};
use scgpt_engine::{RunEnd, Trainer};

mod common;
use common::{metrics, root};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny integration run on the bundled PBMC cells, with the cell-cycle phase as the batch.
fn integration(run: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.input=\"{}\"", root().join("tests/data/pbmc68k_reduced.h5ad").display()),
        "data.allow_non_integer=true".into(),
        "data.batch_col=\"phase\"".into(),
        "data.single_batch_minibatches=true".into(),
        "data.shuffle_window=1000".into(),
        "data.valid_fraction=0.1".into(),
        "task.kind=\"integration\"".into(),
        "task.include_zero_gene=true".into(),
        "model.MVC=true".into(),
        "model.DAR=true".into(),
        "model.explicit_zero_prob=true".into(),
        "model.domain_spec_batchnorm=\"dsbn\"".into(),
        "model.use_batch_labels=true".into(),
        "model.ecs_thres=0.8".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=64".into(),
        "model.dropout=0.0".into(),
        "train.ecs=true".into(),
        "train.mask_ratio=0.4".into(),
        "train.batch_size=32".into(),
        "train.lr=2e-3".into(),
        "train.warmup_steps=2".into(),
        "train.schedule=\"step\"".into(),
        "train.epochs=3".into(),
        "train.max_steps=0".into(),
        "train.eval_each_epoch=true".into(),
        "train.eval_every=1000".into(),
        "train.save_every=1000".into(),
        "train.log_every=2".into(),
        "valid.label_set=\"\"".into(),
        "run.threads=2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    resolve(None, &sets).unwrap()
}

fn params_of(t: &Trainer) -> Vec<f32> {
    let p = list_params(t.model()).unwrap();
    flatten_params(t.model(), &p)
}

#[test]
fn integration_trains_every_term_and_writes_a_self_contained_best_model() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut t = Trainer::new(integration(&run, &[]), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    let m = t.model();
    assert!(m.dsbn.is_some() && m.grad_reverse_discriminator.is_some() && m.mvc_decoder.is_some() && m.config.explicit_zero_prob);
    let total = t.total_steps();
    assert_eq!(t.run().unwrap(), RunEnd::Finished { steps: total });

    let m = metrics(&run);
    for term in ["gep", "gep_zero", "gepc", "gepc_zero", "ecs", "dar"] {
        let v: Vec<f64> = m.iter().filter_map(|l| l[format!("train/loss_{term}")].as_f64()).collect();
        assert!(v.len() >= 3 && v.iter().all(|x| x.is_finite()), "train/loss_{term}: {v:?}");
    }
    let gep: Vec<f64> = m.iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect();
    assert!(gep.last().unwrap() < &gep[0], "GEP did not fall: {gep:?}");
    // ECS is 1 − (s − 0.8)² averaged: within [0, 1] (s in [0, 1] after the ReLU).
    assert!(m.iter().filter_map(|l| l["train/loss_ecs"].as_f64()).all(|e| (0.0..=1.0).contains(&e)));
    let mse: Vec<f64> = m.iter().filter_map(|l| l["valid/mse"].as_f64()).collect();
    assert_eq!(mse.len(), 3, "one validation per epoch: {m:?}");
    assert!(m.iter().any(|l| l["valid/dar_accuracy"].as_f64().is_some()));
    assert!(m.iter().all(|l| l.get("train/loss_cls").is_none() && l.get("valid/accuracy").is_none()), "labels are never read");

    let best = run.join("best_model");
    for f in ["best_model.pt", "args.json", "vocab.json", "batch_labels.json", "scgpt.json"] {
        assert!(best.join(f).is_file(), "best_model/{f} missing");
    }
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("scgpt.json")).unwrap()).unwrap();
    assert_eq!(spec["task"], "integration");
    assert_eq!(spec["include_zero_gene"], true);
    assert_eq!(spec["cls_value"], 0.0);
    assert_eq!(spec["batch_col"], "phase");
    assert!(spec["genes"].as_array().map_or(0, Vec::len) > 100, "the token genes are recorded: {spec}");
    let args: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("args.json")).unwrap()).unwrap();
    assert_eq!(
        (args["DAB"].as_bool(), args["explicit_zero_prob"].as_bool(), args["num_batch_labels"].as_u64()),
        (Some(true), Some(true), Some(3)),
        "{args}"
    );
    // The exported model loads into the original's architecture with every key used.
    let mut vocab = scgpt_data::vocab::GeneVocab::from_file(&best.join("vocab.json")).unwrap();
    vocab.ensure_specials();
    let config = scgpt_model::ModelConfig::from_args_json(best.join("args.json"), vocab.len())
        .unwrap()
        .with_pad_token_id(vocab.pad_id().unwrap() as usize);
    assert!(config.do_dab && config.do_mvc);
    let mut model = config.init(&scgpt_model::burn::tensor::Device::flex()).unwrap();
    let report = scgpt_model::load_pretrained(&mut model, best.join("best_model.pt")).unwrap();
    // The original saves num_batches_tracked with each BatchNorm; it is a counter, not a weight.
    assert!(report.missing.is_empty() && report.skipped.iter().all(|k| k.key.ends_with("num_batches_tracked")), "{report}");
}

#[test]
fn a_resumed_integration_run_ends_identical() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |run: &Path| integration(run, &["train.epochs=2", "train.save_every=3", "train.grad_accum=2", "train.batch_size=16"]);
    let a = tmp.path().join("a");
    let mut ta = Trainer::new(cfg(&a), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    ta.run().unwrap();
    let b = tmp.path().join("b");
    let mut tb = Trainer::new(cfg(&b), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    let stop = ta.state.step / 2 + 1;
    assert_eq!(tb.run_until(Some(stop)).unwrap(), RunEnd::Interrupted { steps: stop, signal: 0 });
    drop(tb);
    let mut tb = Trainer::new(cfg(&b), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    tb.run().unwrap();
    let (want, got) = (params_of(&ta), params_of(&tb));
    let differing = want.iter().zip(&got).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} parameters differ after resume", want.len());
    assert_eq!(ta.state, tb.state);
}

#[test]
fn integration_settings_are_checked_and_other_tasks_reject_its_terms() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let dir = format!("run.dir=\"{}\"", run.display());
    let e = format!("{:#}", resolve(None, &[dir.clone(), "task.kind=\"integration\"".into()]).unwrap_err());
    assert!(e.contains("data.batch_col"), "{e}");
    let e = format!(
        "{:#}",
        resolve(None, &[dir.clone(), "task.kind=\"integration\"".into(), "data.batch_col=\"b\"".into(), "train.cls=true".into()])
            .unwrap_err()
    );
    assert!(e.contains("train.cls"), "{e}");
    // The generative objective computes neither DAR nor the zero probabilities.
    for key in ["model.DAR", "model.explicit_zero_prob"] {
        let e = format!("{:#}", resolve(None, &[dir.clone(), "data.batch_col=\"b\"".into(), format!("{key}=true")]).unwrap_err());
        assert!(e.contains(key) && e.contains("generative"), "{e}");
    }
    let e = format!(
        "{:#}",
        resolve(
            None,
            &[
                dir.clone(),
                "task.kind=\"annotation\"".into(),
                "task.label_col=\"c\"".into(),
                "model.MVC=false".into(),
                "data.batch_col=\"b\"".into(),
                "model.DAR=true".into()
            ]
        )
        .unwrap_err()
    );
    assert!(e.contains("model.DAR") && e.contains("annotation"), "{e}");
    let e = format!("{:#}", resolve(None, &[dir, "model.DAR=true".into(), "train.objective=\"mlm\"".into()]).unwrap_err());
    assert!(e.contains("data.batch_col"), "{e}");
}

/// The DAR loss reaches the encoder through gradient reversal: the encoder's gradient from it
/// is the negative of what the same loss gives without reversal, while the discriminator's
/// own gradient is unchanged (it still learns to tell the batches apart).
#[test]
fn dar_reverses_the_gradient_that_reaches_the_encoder() {
    use scgpt_model::burn::tensor::{Device, Int, Tensor, TensorData};
    use scgpt_model::{ForwardFlags, ModelConfig, ModelInput, TransformerModel};
    // Seeding is global to the backend: not while another test initialises a model.
    let _turn = serial();
    let dev = Device::flex().autodiff();
    dev.seed(3);
    let mut c = ModelConfig::new(20, 16, 2, 16, 1).with_pad_token_id(19);
    c.dropout = 0.0;
    c.do_dab = true;
    c.num_batch_labels = Some(3);
    let model = c.init(&dev).unwrap();
    let grads_of = |m: &TransformerModel| {
        let (b, l) = (4, 6);
        let genes: Vec<i64> = (0..b * l).map(|i| (i % 18) as i64).collect();
        let values: Vec<f32> = (0..b * l).map(|i| (i % 5) as f32).collect();
        let input = ModelInput {
            src: Tensor::<2, Int>::from_data(TensorData::new(genes, [b, l]), &dev),
            values: Tensor::<2>::from_data(TensorData::new(values, [b, l]), &dev),
            src_key_padding_mask: Tensor::<2>::zeros([b, l], &dev).bool(),
            batch_labels: None,
        };
        let logits = m.forward(input, ForwardFlags::default()).unwrap().dab_output.unwrap();
        let logp = scgpt_model::burn::tensor::activation::log_softmax(logits, 1);
        let target = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 1], [4, 1]), &dev);
        let loss = logp.gather(1, target).sum().neg();
        let grads = loss.backward();
        let flat = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let enc = flat(m.encoder.embedding.weight.val().grad(&grads).unwrap());
        let disc = flat(m.grad_reverse_discriminator.as_ref().unwrap().out_layer.weight.val().grad(&grads).unwrap());
        (enc, disc)
    };
    let (enc_rev, disc_rev) = grads_of(&model);
    let mut plain = model.clone();
    plain.grad_reverse_discriminator.as_mut().unwrap().reverse_grad = false;
    let (enc_plain, disc_plain) = grads_of(&plain);
    assert!(enc_rev.iter().any(|g| g.abs() > 1e-6), "the DAR loss reaches the encoder");
    for (r, p) in enc_rev.iter().zip(&enc_plain) {
        assert!((r + p).abs() <= 1e-6 * (1.0 + p.abs()), "encoder gradient not reversed: {r} vs {p}");
    }
    assert_eq!(disc_rev, disc_plain, "the discriminator's own gradient is not reversed");
}

#[test]
fn one_batch_is_nothing_to_integrate_and_a_missing_column_lists_the_columns() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let wu = |run: &str, col: &str| {
        let mut c = integration(&tmp.path().join(run), &[&format!("data.batch_col=\"{col}\"")]);
        c.data.input = vec![root().join("tests/data/wu2020_200.h5ad")];
        c.data.allow_non_integer = false;
        c
    };
    // wu2020's `multi_chain` is "False" for every cell.
    let e = format!("{:#}", Trainer::new(wu("one", "multi_chain"), Box::new(scgpt_dist::Single::new())).err().expect("an error"));
    assert!(e.contains("multi_chain") && e.contains("1 value") && e.contains("at least 2"), "{e}");
    let e = format!("{:#}", Trainer::new(wu("missing", "donor"), Box::new(scgpt_dist::Single::new())).err().expect("an error"));
    assert!(e.contains("donor") && e.contains("patient"), "the missing column and the ones there: {e}");
}

/// Masked-value pretraining honours the switches the integration task added: with
/// `explicit_zero_prob` and `DAR` on, their terms are computed and logged.
#[test]
fn masked_value_pretraining_computes_the_zero_probability_and_dar_terms() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("mlm");
    let sets: Vec<String> = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.input=\"{}\"", root().join("tests/data/pbmc68k_reduced.h5ad").display()),
        "data.allow_non_integer=true".into(),
        "data.batch_col=\"phase\"".into(),
        "train.objective=\"mlm\"".into(),
        "model.DAR=true".into(),
        "model.explicit_zero_prob=true".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=64".into(),
        "train.batch_size=32".into(),
        "train.max_steps=3".into(),
        "train.log_every=1".into(),
        "valid.label_set=\"\"".into(),
        "run.threads=2".into(),
    ];
    let mut t = Trainer::new(resolve(None, &sets).unwrap(), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    assert!(t.model().grad_reverse_discriminator.is_some() && t.model().config.explicit_zero_prob);
    t.run().unwrap();
    let m = metrics(&run);
    for term in ["gep", "gep_zero", "gepc", "gepc_zero", "dar"] {
        let v: Vec<f64> = m.iter().filter_map(|l| l[format!("train/loss_{term}")].as_f64()).collect();
        assert!(v.len() == 3 && v.iter().all(|x| x.is_finite() && *x > 0.0), "train/loss_{term}: {v:?}");
    }
}
