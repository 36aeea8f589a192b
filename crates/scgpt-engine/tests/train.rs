//! The training engine on the bundled real data (wu2020_200, pbmc68k_reduced) with tiny
//! models on the Flex CPU backend: the loss falls, a resumed run ends bit-identical to an
//! uninterrupted one, TensorBoard reads the logs, the best model exports to the original's
//! format, continual pretraining extends the vocabulary, configs are checked.

use std::path::Path;
use std::process::Command;

use scgpt_engine::config::resolve;

mod common;
use common::{metrics, prep, python, root, tiny};
use scgpt_engine::optim::{flatten_params, list_params};
use scgpt_engine::{RunEnd, Trainer};

/// burn-flex draws dropout masks from one process-wide RNG, which `Trainer` reseeds per step;
/// training tests in parallel threads would interleave their draws, so they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn params_of(t: &Trainer) -> Vec<f32> {
    let p = list_params(t.model()).unwrap();
    flatten_params(t.model(), &p)
}

#[test]
fn generative_pretraining_loss_falls_and_logs_read_back_in_tensorboard() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &["output.obs_cols=[\"cluster_orig\"]"]);
    let run = tmp.path().join("run");
    let cfg = tiny(
        &run,
        &shards,
        &[
            "train.max_steps=60".into(),
            "train.log_every=5".into(),
            "train.eval_every=30".into(),
            "train.save_every=30".into(),
            "train.lr=2e-3".into(),
        ],
    );
    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    assert_eq!(t.run().unwrap(), RunEnd::Finished { steps: 60 });

    let m = metrics(&run);
    let gep: Vec<f64> = m.iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect();
    assert_eq!(gep.len(), 12, "one line per 5 steps");
    let first = gep[0];
    let last = gep[gep.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(last < 0.65 * first, "GEP loss did not fall: {gep:?}");
    for term in ["train/loss_gepc", "train/loss_cell_prompt", "train/lr", "train/grad_norm", "train/cells_per_s", "train/tokens_per_s"] {
        assert!(m.iter().any(|l| l[term].is_number()), "{term} not logged");
    }
    let valid: Vec<&serde_json::Value> = m.iter().filter(|l| l["valid/mse"].is_number()).collect();
    assert_eq!(valid.len(), 2);
    let knn = valid[1]["valid/knn_accuracy"].as_f64().unwrap();
    let asw = valid[1]["valid/asw_label"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&knn) && (0.0..=1.0).contains(&asw));

    // The run directory: resolved config, vocab, args, checkpoints (keep_last 2), best model.
    for f in [
        "config.resolved.toml",
        "vocab.json",
        "args.json",
        "best/model.safetensors",
        "best_model/best_model.pt",
        "best_model/args.json",
        "best_model/vocab.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let steps: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(steps.len(), 2, "{steps:?}");

    // The exported best model loads through the original-format loader with every key used.
    let mut vocab = scgpt_data::vocab::GeneVocab::from_file(&run.join("best_model/vocab.json")).unwrap();
    vocab.ensure_specials();
    let config = scgpt_model::ModelConfig::from_args_json(run.join("best_model/args.json"), vocab.len())
        .unwrap()
        .with_pad_token_id(vocab.pad_id().unwrap() as usize);
    assert!(config.use_generative_training && config.do_mvc);
    let mut model = config.init(&scgpt_model::burn::tensor::Device::flex()).unwrap();
    let report = scgpt_model::load_pretrained(&mut model, run.join("best_model/best_model.pt")).unwrap();
    assert!(report.skipped.is_empty(), "{report}");
    assert!(report.missing.iter().all(|k| k.starts_with("cls_decoder.")), "{report}");

    // TensorBoard's own reader.
    let out = Command::new(python())
        .arg(root().join("tests/py/read_tensorboard.py"))
        .arg(run.join("tensorboard"))
        .output()
        .expect("run python: make the venv with launch/setup.sh");
    assert!(out.status.success(), "read_tensorboard.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let tb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tb_gep: Vec<f64> = tb["train/loss_gep"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    let tb_steps: Vec<u64> = tb["train/loss_gep"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(tb_steps, (1..=12).map(|i| i * 5).collect::<Vec<u64>>());
    for (a, b) in tb_gep.iter().zip(&gep) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    }
    assert!(tb["valid/mse"].as_array().unwrap().len() == 2);
}

#[test]
fn a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &[]);
    // Dropout on, grad accumulation, an epoch boundary inside the run (180 train cells / 32).
    let extra = |run: &Path| {
        let mut c = tiny(
            run,
            &shards,
            &[
                "train.max_steps=14".into(),
                "train.grad_accum=2".into(),
                "train.save_every=4".into(),
                "train.eval_every=7".into(),
                "train.log_every=2".into(),
                "valid.label_set=\"\"".into(),
            ],
        );
        c.train.keep_last = 5;
        c
    };
    let a = tmp.path().join("a");
    let mut ta = Trainer::new(extra(&a), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    ta.run().unwrap();
    let want = params_of(&ta);

    let b = tmp.path().join("b");
    let mut tb = Trainer::new(extra(&b), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    tb.run_until(Some(6)).unwrap();
    assert_eq!(tb.state.step, 6);
    drop(tb);
    let mut tb = Trainer::new(extra(&b), Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    assert_eq!(tb.state.step, 6, "resumed from the step-6 checkpoint");
    tb.run().unwrap();
    let got = params_of(&tb);
    assert_eq!(want.len(), got.len());
    let differing = want.iter().zip(&got).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    if differing > 0 {
        let mut off = 0;
        for p in list_params(tb.model()).unwrap() {
            let n = p.numel();
            let d = want[off..off + n].iter().zip(&got[off..off + n]).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            let worst = want[off..off + n].iter().zip(&got[off..off + n]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            if d > 0 {
                eprintln!("{}: {d} of {n} differ (worst {worst:e})", p.path);
            }
            off += n;
        }
    }
    assert_eq!(differing, 0, "{differing} of {} parameters differ after resume", want.len());
    assert_eq!(ta.state, tb.state);
    assert!(ta.state.position.epoch >= 1, "the run crossed an epoch: {:?}", ta.state.position);
}

#[test]
fn blockwise_attention_trains_to_the_parameters_of_explicit_attention() {
    // Generative objective (both passes, the gen stream's own keys), dropout on, padded cells:
    // the blockwise path recomputes probabilities and dropout masks in the backward, so after
    // 8 Adam steps the parameters agree with the explicit path's to float rounding.
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &[]);
    let run = |name: &str, attention: &str| {
        let dir = tmp.path().join(name);
        let cfg = tiny(
            &dir,
            &shards,
            &[
                "train.max_steps=8".into(),
                "train.eval_every=100".into(),
                "train.save_every=100".into(),
                "train.log_every=1".into(),
                "valid.label_set=\"\"".into(),
                format!("run.attention=\"{attention}\""),
                "run.attention_block_rows=10".into(),
            ],
        );
        assert!(cfg.model.dropout > 0.0, "the test wants dropout on");
        let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
        let rows = if attention == "blockwise" { 10 } else { 0 };
        assert!(t.model().transformer_encoder.layers.iter().all(|l| l.self_attn.block_rows == rows), "run.attention reaches every layer");
        t.run().unwrap();
        (params_of(&t), metrics(&dir))
    };
    let (explicit, m_explicit) = run("explicit", "explicit");
    let (blockwise, m_blockwise) = run("blockwise", "blockwise");
    let start = tiny(&tmp.path().join("x"), &shards, &[]);
    assert_eq!(start.run.attention.as_str(), "explicit", "explicit stays the default");
    let worst = explicit.iter().zip(&blockwise).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "parameters differ by up to {worst}");
    let loss = |m: &[serde_json::Value]| m.iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect::<Vec<_>>();
    let (a, b) = (loss(&m_explicit), loss(&m_blockwise));
    assert!(!a.is_empty() && a.len() == b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "GEP loss {x} (explicit) vs {y} (blockwise)");
    }
}

#[test]
fn mlm_objective_with_ecs_trains() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &[]);
    let run = tmp.path().join("run");
    let cfg = tiny(
        &run,
        &shards,
        &[
            "train.objective=\"mlm\"".into(),
            "train.ecs=true".into(),
            "train.max_steps=40".into(),
            "train.log_every=5".into(),
            "train.lr=4e-3".into(),
            "valid.label_set=\"\"".into(),
        ],
    );
    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    t.run().unwrap();
    let m = metrics(&run);
    let gep: Vec<f64> = m.iter().filter_map(|l| l["train/loss_gep"].as_f64()).collect();
    assert!(gep[gep.len() - 1] < 0.85 * gep[0], "{gep:?}");
    assert!(m.iter().any(|l| l["train/loss_ecs"].is_number()));
    assert!(!m.iter().any(|l| l["train/loss_cell_prompt"].is_number()));
}

#[test]
fn mlm_with_cls_trains_the_classifier_on_the_labels() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("pbmc");
    prep("pbmc68k_reduced.h5ad", &shards, &["input.allow_non_integer=true", "output.obs_cols=[\"bulk_labels\"]"]);
    let run = tmp.path().join("run");
    let cfg = tiny(
        &run,
        &shards,
        &[
            "train.objective=\"mlm\"".into(),
            "train.cls=true".into(),
            "train.cls_col=\"bulk_labels\"".into(),
            "train.max_steps=60".into(),
            "train.log_every=5".into(),
            "train.eval_every=60".into(),
            "train.lr=3e-3".into(),
            "data.valid_fraction=0.2".into(),
            "valid.label_set=\"\"".into(),
        ],
    );
    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    t.run().unwrap();
    // The classes are the data's 10 PBMC types, sorted (tests/data/README.md).
    let classes: Vec<String> = serde_json::from_str(&std::fs::read_to_string(run.join("classes.json")).unwrap()).unwrap();
    assert_eq!(classes.len(), 10, "{classes:?}");
    assert!(classes.windows(2).all(|w| w[0] < w[1]) && classes.contains(&"Dendritic".to_string()), "{classes:?}");
    assert_eq!(t.model().config.n_cls, 10);
    let m = metrics(&run);
    let cls: Vec<f64> = m.iter().filter_map(|l| l["train/loss_cls"].as_f64()).collect();
    // Analytic anchors: an untrained head is near the uniform cross entropy ln 10 = 2.30, and a
    // head that has learned the class frequencies sits at their entropy, 1.906 for these 700
    // cells (tests/data/README.md counts). The cross entropy reaches the gradient and the head
    // trains to at least that. (A from-scratch model this small keeps near-identical <cls>
    // embeddings within the test's budget, so separating the types is not asserted.)
    assert!((1.9..2.9).contains(&cls[0]), "first cls loss {cls:?}");
    let late = cls[cls.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(late < cls[0] - 0.2 && late < 1.906 + 0.15, "{cls:?}");
    let acc = m.iter().filter_map(|l| l["valid/cls_accuracy"].as_f64()).next_back().expect("valid/cls_accuracy logged");
    assert!((0.0..=1.0).contains(&acc), "held-out accuracy {acc}");
    // The exported model carries the classifier under the original's names.
    let args: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("best_model/args.json")).unwrap()).unwrap();
    assert_eq!(args["n_cls"], 10);
}

#[test]
fn cls_on_a_column_the_data_lacks_names_the_column_and_the_fix() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &[]);
    let cfg = tiny(
        &tmp.path().join("run"),
        &shards,
        &["train.objective=\"mlm\"".into(), "train.cls=true".into(), "train.cls_col=\"cell_type\"".into(), "valid.label_set=\"\"".into()],
    );
    let err = format!("{:#}", Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).err().expect("an error"));
    assert!(err.contains("cell_type") && err.contains("--obs-cols"), "{err}");
}

#[test]
fn continual_pretraining_extends_the_vocabulary_and_keeps_old_rows() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let wu = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &wu, &["vocab.build=true"]);
    let pbmc = tmp.path().join("pbmc");
    prep("pbmc68k_reduced.h5ad", &pbmc, &["vocab.build=true", "input.allow_non_integer=true"]);
    let first = tmp.path().join("first");
    let cfg = tiny(&first, &wu, &["train.max_steps=4".into(), "train.eval_every=4".into(), "valid.label_set=\"\"".into()]);
    Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet().run().unwrap();

    let old_vocab = scgpt_data::vocab::GeneVocab::from_file(&first.join("best_model/vocab.json")).unwrap();
    let cont = tmp.path().join("cont");
    let cfg = tiny(
        &cont,
        &pbmc,
        &[format!("model.init_from=\"{}\"", first.join("best_model").display()), "train.max_steps=2".into(), "valid.label_set=\"\"".into()],
    );
    let t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    let new_ntoken = t.model().config.ntoken;
    assert!(new_ntoken > old_vocab.len(), "pbmc genes were appended ({new_ntoken} vs {})", old_vocab.len());
    let new_vocab = scgpt_data::vocab::GeneVocab::from_file(&cont.join("vocab.json")).unwrap();
    assert_eq!(&new_vocab.tokens()[..old_vocab.len()], old_vocab.tokens(), "old ids unchanged");

    // Old rows are the exported ones; new rows are U(-0.1, 0.1).
    let device = scgpt_model::burn::tensor::Device::flex();
    let mut old_model = scgpt_model::ModelConfig::from_args_json(first.join("best_model/args.json"), old_vocab.len())
        .unwrap()
        .with_pad_token_id(old_vocab.pad_id().unwrap() as usize)
        .init(&device)
        .unwrap();
    scgpt_model::load_pretrained(&mut old_model, first.join("best_model/best_model.pt")).unwrap();
    let old_rows: Vec<f32> = old_model.encoder.embedding.weight.val().into_data().try_to_vec::<f32>().unwrap();
    let new_rows: Vec<f32> = t.model().encoder.embedding.weight.val().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(&new_rows[..old_rows.len()], &old_rows[..]);
    assert!(new_rows[old_rows.len()..].iter().all(|x| x.abs() <= 0.1));
}

#[test]
fn config_errors_name_the_key() {
    let e = resolve(None, &["train.lrr=1".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("lrr"), "{e:#}");
    let e = resolve(None, &["train.objective=\"gan\"".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("train.objective"), "{e:#}");
    let e = resolve(None, &["train.batch_size=\"many\"".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("batch_size"), "{e:#}");
    // The shipped configs parse.
    for c in ["pretrain_tiny.toml", "pretrain_human.toml", "continual_brain.toml"] {
        let cfg = resolve(Some(&root().join("configs").join(c)), &[]).unwrap_or_else(|e| panic!("{c}: {e:#}"));
        if c == "pretrain_human.toml" {
            assert_eq!((cfg.model.nlayers, cfg.model.embsize, cfg.model.nheads, cfg.model.d_hid), (12, 512, 8, 512));
            assert_eq!((cfg.train.lr, cfg.train.warmup_steps, cfg.train.batch_size, cfg.train.epochs), (1e-4, 10000, 32, 6));
            assert_eq!(cfg.data.shards.len(), 8);
        }
    }
}

#[test]
fn missing_shards_are_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny(&tmp.path().join("r"), &tmp.path().join("nope"), &[]);
    let e = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).err().expect("error");
    let msg = format!("{e:#}");
    assert!(msg.contains("nope") && msg.contains("manifest"), "{msg}");
}

#[test]
fn non_finite_gradients_skip_the_update() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("wu");
    prep("wu2020_200.h5ad", &shards, &[]);
    let run = tmp.path().join("run");
    // A rate of 1e36 blows the parameters up after the first update; later gradients overflow.
    let cfg = tiny(
        &run,
        &shards,
        &[
            "train.lr=1e36".into(),
            "train.warmup_steps=0".into(),
            "train.clip_norm=0.0".into(),
            "train.max_steps=6".into(),
            "valid.label_set=\"\"".into(),
        ],
    );
    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    assert_eq!(t.run().unwrap(), RunEnd::Finished { steps: 6 });
    assert!(t.state.skipped_steps >= 1, "{:?}", t.state);
    assert!(t.state.skipped_steps < 6, "the first update was finite: {:?}", t.state);
}
