//! The perturbation task on the engine (the original's Tutorial_Perturbation): a simulated
//! GEARS-format screen with planted effects is split by condition, prepared, trained on the
//! `TransformerGenerator` with sampled genes, validated by Pearson on the val conditions, and
//! exported; a resumed run ends identical; bad screens and settings are refused by name.

use std::path::{Path, PathBuf};

use scgpt_engine::config::{resolve, TrainConfig};
use scgpt_engine::optim::{flatten_params, list_params};
use scgpt_engine::{RunEnd, Trainer};
use scgpt_model::TransformerGenerator;

mod common;
use common::metrics;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small simulated screen: 80 genes, 12 perturbed, 10 doubles.
fn screen(dir: &Path) -> PathBuf {
    let out = dir.join("screen.h5ad");
    let args = scgpt_prep::simulate_perturbation::SimulatePerturbationArgs {
        out: out.clone(),
        truth: None,
        genes: 80,
        perturbed_genes: 12,
        doubles: 10,
        synergy_fraction: 0.5,
        modules: None,
        cells_per_condition: 12,
        control_cells: 120,
        targets_per_gene: 6,
        synergy_targets: None,
        min_lfc: 0.5,
        max_lfc: 2.0,
        counts_per_gene: 4.0,
        cell_type: "K562".into(),
        seed: 3,
        quiet: true,
    };
    scgpt_prep::simulate_perturbation::run(&args).unwrap();
    out
}

fn perturbation(run: &Path, screen: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.input=\"{}\"", screen.display()),
        "data.gene_col=\"gene_name\"".into(),
        "data.shuffle_window=1000".into(),
        "data.valid_fraction=0.0".into(),
        "task.kind=\"perturbation\"".into(),
        "model.MVC=false".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=48".into(),
        "model.dropout=0.0".into(),
        "model.pad_value=0.0".into(),
        "train.batch_size=16".into(),
        "train.lr=2e-3".into(),
        "train.warmup_steps=0".into(),
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

fn start(cfg: TrainConfig) -> anyhow::Result<Trainer<TransformerGenerator>> {
    Ok(Trainer::perturbation(cfg, Box::new(scgpt_dist::Single::new()))?.quiet())
}

fn params_of(t: &Trainer<TransformerGenerator>) -> Vec<f32> {
    let p = list_params(t.model()).unwrap();
    flatten_params(t.model(), &p)
}

#[test]
fn perturbation_trains_on_sampled_genes_validates_by_pearson_and_exports() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let screen = screen(tmp.path());
    let run = tmp.path().join("run");
    let mut t = start(perturbation(&run, &screen, &[])).unwrap();
    let total = t.total_steps();
    assert_eq!(t.run().unwrap(), RunEnd::Finished { steps: total });

    // The split: every non-control condition once; the test conditions never trained on.
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    let list = |k: &str| -> Vec<String> { split[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect() };
    let (train, val, test) = (list("train"), list("val"), list("test"));
    assert!(!train.is_empty() && !val.is_empty() && !test.is_empty(), "{split}");
    let mut all: Vec<&String> = train.iter().chain(&val).chain(&test).collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "a condition in two lists");
    assert_eq!(n, 12 + 10, "every non-control condition of the screen: {split}");
    let prepared = scgpt_data::loader::ShardSet::open(&run.join("data/train"), 1.0).unwrap();
    assert_eq!(prepared.cells(), 120 + 12 * train.len(), "control cells and the train conditions' cells");

    let m = metrics(&run);
    let mse: Vec<f64> = m.iter().filter_map(|l| l["train/loss_mse"].as_f64()).collect();
    assert!(mse.len() >= 3 && mse.iter().all(|x| x.is_finite()), "{mse:?}");
    assert!(mse.last().unwrap() < &mse[0], "MSE did not fall: {mse:?}");
    let pearson: Vec<f64> = m.iter().filter_map(|l| l["valid/pearson"].as_f64()).collect();
    assert_eq!(pearson.len(), 3, "one validation per epoch: {m:?}");
    assert!(pearson.iter().all(|p| (-1.0..=1.0).contains(p)));
    assert!(m.iter().any(|l| l["valid/pearson_delta"].as_f64().is_some()));

    let best = run.join("best_model");
    for f in ["best_model.pt", "perturbation_config.json", "vocab.json", "screen.json", "split.json", "scgpt.json"] {
        assert!(best.join(f).is_file(), "best_model/{f} missing");
    }
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("scgpt.json")).unwrap()).unwrap();
    assert_eq!(spec["task"], "perturbation");
    // The criterion is −pearson of the best validation.
    let best_pearson = pearson.iter().cloned().fold(f64::MIN, f64::max);
    assert!((spec["best_criterion"].as_f64().unwrap() + best_pearson).abs() < 1e-9, "{spec} vs {pearson:?}");
    let (model, _) =
        scgpt_model::io::perturbation_checkpoint::load_exported_perturbation(&best, &scgpt_model::burn::tensor::Device::flex()).unwrap();
    assert_eq!(model.config.d_model, 32);
}

#[test]
fn a_resumed_perturbation_run_ends_identical() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let screen = screen(tmp.path());
    let cfg =
        |run: &Path| perturbation(run, &screen, &["train.epochs=2", "train.save_every=3", "train.grad_accum=2", "train.batch_size=8"]);
    let a = tmp.path().join("a");
    let mut ta = start(cfg(&a)).unwrap();
    ta.run().unwrap();
    let b = tmp.path().join("b");
    let mut tb = start(cfg(&b)).unwrap();
    let stop = ta.state.step / 2 + 1;
    assert_eq!(tb.run_until(Some(stop)).unwrap(), RunEnd::Interrupted { steps: stop, signal: 0 });
    drop(tb);
    let mut tb = start(cfg(&b)).unwrap();
    tb.run().unwrap();
    let (want, got) = (params_of(&ta), params_of(&tb));
    let differing = want.iter().zip(&got).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} parameters differ after resume", want.len());
    assert_eq!(ta.state, tb.state);
}

#[test]
fn bad_screens_and_settings_are_refused_by_name() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let screen = screen(tmp.path());
    let err = |cfg: anyhow::Result<TrainConfig>| -> String {
        match cfg.and_then(start) {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        }
    };
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let cfg = |extra: &[&str]| -> anyhow::Result<TrainConfig> {
        let run = tmp.path().join(format!("run{}", runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        let mut sets = vec![
            format!("run.dir=\"{}\"", run.display()),
            format!("data.input=\"{}\"", screen.display()),
            "task.kind=\"perturbation\"".to_string(),
            "data.gene_col=\"gene_name\"".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        resolve(None, &sets)
    };
    // MVC is on in the default config; the task does not compute it.
    let e = err(cfg(&[]));
    assert!(e.contains("model.MVC"), "{e}");
    let e = err(cfg(&["model.MVC=false", "data.control=\"none\""]));
    assert!(e.contains("no control cells") && e.contains("\"none\""), "{e}");
    let e = err(cfg(&["model.MVC=false", "data.condition_col=\"perturbation\""]));
    assert!(e.contains("perturbation") && e.contains("condition"), "{e}");
    let e = err(cfg(&["model.MVC=false", "task.split=\"random\""]));
    assert!(e.contains("task.split") && e.contains("simulation"), "{e}");
    // The separator decides how conditions parse: with "-" none of `G+ctrl` is a condition.
    let e = err(cfg(&["model.MVC=false", "data.separator=\"-\""]));
    assert!(e.contains("cannot be read") && e.contains("separator \"-\""), "{e}");
}

/// The simulated screen rewritten: `edit` changes the conditions and the matrix.
fn edited_screen(src: &Path, out: &Path, edit: impl FnOnce(&mut scgpt_engine::screen::Screen)) -> PathBuf {
    let opts = scgpt_engine::screen::ScreenOptions {
        condition_col: "condition".into(),
        control: "ctrl".into(),
        separator: "+".into(),
        gene_col: "gene_name".into(),
        normalize: false,
    };
    let mut s = scgpt_engine::screen::Screen::read(src, &opts).unwrap();
    edit(&mut s);
    scgpt_engine::perturbation_data::write_screen(&s, out).unwrap();
    out.to_path_buf()
}

#[test]
fn genes_outside_the_screen_are_skipped_or_refused_and_counts_need_normalize() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let screen = screen(tmp.path());
    // One single's cells relabelled as a gene the screen does not measure.
    let odd = edited_screen(&screen, &tmp.path().join("odd.h5ad"), |s| {
        let first = s.conditions.iter().find(|c| c.ends_with("+ctrl")).unwrap().clone();
        s.conditions.iter_mut().filter(|c| **c == first).for_each(|c| *c = "NOTAGENE+ctrl".into());
    });
    let run = tmp.path().join("skip");
    let mut t = start(perturbation(&run, &odd, &["train.max_steps=1", "train.epochs=1"])).unwrap();
    t.run().unwrap();
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("data/screen.json")).unwrap()).unwrap();
    assert_eq!(spec["skipped"][0][0], "NOTAGENE+ctrl", "{spec}");
    assert!(spec["skipped"][0][1].as_str().unwrap().contains("not among the screen's genes"));
    let e = match start(perturbation(&tmp.path().join("strict"), &odd, &["data.strict=true"])) {
        Ok(_) => panic!("strict accepted a condition of an unknown gene"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("NOTAGENE+ctrl") && e.contains("data.strict"), "{e}");

    // Raw counts: refused, then read after normalising as GEARS.
    let counts = edited_screen(&screen, &tmp.path().join("counts.h5ad"), |s| {
        s.x.data.iter_mut().for_each(|v| *v = (v.exp_m1() * 3.0).round().max(1.0));
    });
    let e = match start(perturbation(&tmp.path().join("counts"), &counts, &[])) {
        Ok(_) => panic!("counts accepted as log-normalised"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("integer") && e.contains("data.normalize"), "{e}");
    let run = tmp.path().join("normalised");
    let mut t = start(perturbation(&run, &counts, &["data.normalize=true", "train.max_steps=1", "train.epochs=1"])).unwrap();
    t.run().unwrap();
    assert!(run.join("data/screen.normalized.h5ad").is_file());
}
