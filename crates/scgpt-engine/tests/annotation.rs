//! The annotation task on the engine: fine-tuning from an h5ad in one config (the bundled
//! pbmc68k_reduced, 10 cell types), a self-contained best_model/, TensorBoard learning curves,
//! exact resume, and the config checks that keep other tasks' switches out.

use std::path::Path;
use std::process::Command;

use scgpt_engine::config::{resolve, TrainConfig};
use scgpt_engine::optim::{flatten_params, list_params};
use scgpt_engine::{RunEnd, Trainer};

mod common;
use common::{metrics, python, root};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny annotation run on the bundled PBMC cells (log1p values in raw/X).
fn annotation(run: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.input=\"{}\"", root().join("tests/data/pbmc68k_reduced.h5ad").display()),
        "data.allow_non_integer=true".into(),
        "data.valid_fraction=0.15".into(),
        "task.kind=\"annotation\"".into(),
        "task.label_col=\"bulk_labels\"".into(),
        "model.MVC=false".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=128".into(),
        "model.dropout=0.1".into(),
        "train.batch_size=32".into(),
        "train.lr=2e-3".into(),
        "train.warmup_steps=5".into(),
        "train.schedule=\"step\"".into(),
        "train.epochs=3".into(),
        "train.max_steps=0".into(),
        "train.eval_each_epoch=true".into(),
        "train.eval_every=1000".into(),
        "train.save_every=1000".into(),
        "train.log_every=5".into(),
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
fn annotation_fine_tunes_from_an_h5ad_and_writes_a_self_contained_best_model() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut t = Trainer::new(annotation(&run, &[]), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    let total = t.total_steps();
    assert_eq!(t.run().unwrap(), RunEnd::Finished { steps: total });

    // The data were prepared into the run directory, with the label column.
    assert!(run.join("data/train/manifest.json").is_file());
    let m = metrics(&run);
    let ce: Vec<f64> = m.iter().filter_map(|l| l["train/loss_cls"].as_f64()).collect();
    assert!(ce.len() >= 4, "{ce:?}");
    let acc: Vec<f64> = m.iter().filter_map(|l| l["valid/accuracy"].as_f64()).collect();
    assert_eq!(acc.len(), 3, "one validation per epoch: {m:?}");
    assert!(ce.last().unwrap() < &ce[0], "cross entropy did not fall: {ce:?}");
    // No other task's terms are logged.
    assert!(m.iter().all(|l| l.get("train/loss_gep").is_none() && l.get("valid/mse").is_none()));
    // The step schedule: lr × 0.9 per epoch after warmup.
    let lrs: Vec<f64> = m
        .iter()
        .filter_map(|l| Some((l["train/epoch"].as_f64()?, l["train/lr"].as_f64()?)))
        .filter(|(e, _)| *e >= 1.0)
        .map(|(e, lr)| lr / 0.9f64.powi(e as i32))
        .collect();
    assert!(lrs.iter().all(|lr| (lr - 2e-3).abs() < 1e-9), "{lrs:?}");

    // best_model/ is self-contained: weights, args, vocab, classes and the inference settings.
    let best = run.join("best_model");
    for f in ["best_model.pt", "args.json", "vocab.json", "classes.json", "scgpt.json"] {
        assert!(best.join(f).is_file(), "best_model/{f} missing");
    }
    let classes: Vec<String> = serde_json::from_str(&std::fs::read_to_string(best.join("classes.json")).unwrap()).unwrap();
    assert_eq!(classes.len(), 10);
    let mut sorted = classes.clone();
    sorted.sort();
    assert_eq!(classes, sorted);
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("scgpt.json")).unwrap()).unwrap();
    assert_eq!(spec["task"], "annotation");
    assert_eq!(spec["cls_value"], 0.0);
    assert_eq!(spec["label_col"], "bulk_labels");
    let args: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["n_cls"], 10);
    // The exported head loads with every key used.
    let mut vocab = scgpt_data::vocab::GeneVocab::from_file(&best.join("vocab.json")).unwrap();
    vocab.ensure_specials();
    let config = scgpt_model::ModelConfig::from_args_json(best.join("args.json"), vocab.len())
        .unwrap()
        .with_pad_token_id(vocab.pad_id().unwrap() as usize);
    assert!(!config.do_mvc && !config.use_generative_training);
    let mut model = config.init(&scgpt_model::burn::tensor::Device::flex()).unwrap();
    let report = scgpt_model::load_pretrained(&mut model, best.join("best_model.pt")).unwrap();
    assert!(report.skipped.is_empty() && report.missing.is_empty(), "{report}");

    // TensorBoard's own reader sees the learning curve.
    let out = Command::new(python())
        .arg(root().join("tests/py/read_tensorboard.py"))
        .arg(run.join("tensorboard"))
        .output()
        .expect("run python: make the venv with launch/setup.sh");
    assert!(out.status.success(), "read_tensorboard.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let tb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tb["train/loss_cls"].as_array().unwrap().len(), ce.len());
    assert_eq!(tb["valid/accuracy"].as_array().unwrap().len(), 3);
}

#[test]
fn a_resumed_fine_tune_ends_identical() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |run: &Path| annotation(run, &["train.epochs=2", "train.save_every=3", "train.grad_accum=2", "train.batch_size=16"]);
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
fn other_tasks_switches_and_missing_labels_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let base = |extra: &str| {
        let mut sets = vec![
            format!("run.dir=\"{}\"", run.display()),
            "task.kind=\"annotation\"".to_string(),
            "task.label_col=\"bulk_labels\"".into(),
            "model.MVC=false".into(),
        ];
        sets.push(extra.to_string());
        resolve(None, &sets)
    };
    let e = format!("{:#}", base("model.MVC=true").unwrap_err());
    assert!(e.contains("model.MVC") && e.contains("annotation"), "{e}");
    let e = format!("{:#}", base("train.ecs=true").unwrap_err());
    assert!(e.contains("train.ecs"), "{e}");
    let e = format!("{:#}", resolve(None, &["train.cce=true".into()]).unwrap_err());
    assert!(e.contains("train.cce") && e.contains("generative"), "{e}");
    let e = format!("{:#}", resolve(None, &["task.kind=\"annotate\"".into()]).unwrap_err());
    assert!(e.contains("task.kind") && e.contains("annotation"), "{e}");

    // A label column the file lacks names the ones it has.
    let _turn = serial();
    let cfg = annotation(&run, &["task.label_col=\"cell_type\""]);
    let e = format!("{:#}", Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).err().expect("an error"));
    assert!(e.contains("cell_type") && e.contains("bulk_labels"), "{e}");
}

#[test]
fn batch_labels_reach_the_model_and_are_saved_with_it() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // pbmc68k's cell-cycle phase as the "batch": three domain-specific batch norms.
    let cfg = annotation(&run, &["data.batch_col=\"phase\"", "model.domain_spec_batchnorm=\"dsbn\"", "train.epochs=1"]);
    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    assert!(t.model().dsbn.is_some());
    t.run().unwrap();
    let best = run.join("best_model");
    let map: Vec<String> = serde_json::from_str(&std::fs::read_to_string(best.join("batch_labels.json")).unwrap()).unwrap();
    assert_eq!(map, vec!["G1", "G2M", "S"]);
    let args: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["num_batch_labels"], 3, "{args}");
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("scgpt.json")).unwrap()).unwrap();
    assert_eq!(spec["batch_col"], "phase");
    let ce: Vec<f64> = metrics(&run).iter().filter_map(|l| l["train/loss_cls"].as_f64()).collect();
    assert!(ce.iter().all(|v| v.is_finite()), "{ce:?}");

    // A model that reads batch labels without a batch column is a config error.
    let e = format!("{:#}", resolve(None, &["model.use_batch_labels=true".into()]).unwrap_err());
    assert!(e.contains("data.batch_col"), "{e}");
}
