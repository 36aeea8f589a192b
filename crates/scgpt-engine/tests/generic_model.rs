//! The loop is written once for any model behind a task: a task on the perturbation model
//! (`TransformerGenerator`) trains through the same `Trainer` (`with_tasks`), logs, keeps a
//! native checkpoint that resumes bit-identically, and exports `best_model/` in the original's
//! format (the tutorial's state_dict) that loads back with every key. The task here is a
//! minimal masked-value objective on the generator (masked positions flagged as perturbed);
//! the perturbation recipe itself is its own issue.

use std::any::Any;
use std::path::Path;

use scgpt_data::loader::ShardSet;
use scgpt_engine::collate::{collate_finetune, CollateOptions, FinetuneTokens, MlmBatch};
use scgpt_engine::config::{resolve, TaskKind, TrainConfig};
use scgpt_engine::optim::{flatten_params, list_params};
use scgpt_engine::tasks::{full_attention_flops, Batch, Evaluation, Loss, LossContext, MicroBatch, ModelShape, Norm, Task, Term};
use scgpt_engine::{RunEnd, Trainer};
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::{ForwardFlags, PerturbationInput, TransformerGenerator};

mod common;
use common::{metrics, root};

struct Masked(MlmBatch);

impl MicroBatch for Masked {
    fn units(&self) -> usize {
        self.0.masked_tokens()
    }
    fn input_tokens(&self) -> usize {
        self.0.pad.iter().filter(|p| !**p).count()
    }
    fn encoder_flops(&self, shape: ModelShape) -> f64 {
        full_attention_flops(shape, self.0.batch, self.0.len)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Masked values on the generator: masked positions carry value 0 and the "perturbed" flag.
struct GeneratorMasking {
    terms: [Term; 1],
}

fn input(b: &MlmBatch, d: &Device) -> PerturbationInput {
    let (n, l) = (b.batch, b.len);
    let values: Vec<f32> = b.values.iter().zip(&b.masked).map(|(&v, &m)| if m { 0.0 } else { v.max(0.0) }).collect();
    let flags: Vec<i64> = b.masked.iter().map(|&m| i64::from(m)).collect();
    PerturbationInput {
        src: Tensor::<2, Int>::from_data(TensorData::new(b.genes.clone(), [n, l]), d),
        values: Tensor::<2>::from_data(TensorData::new(values, [n, l]), d),
        input_pert_flags: Tensor::<2, Int>::from_data(TensorData::new(flags, [n, l]), d),
        src_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(b.pad.clone(), [n, l]), d),
    }
}

fn sq_sum(m: &TransformerGenerator, b: &MlmBatch, d: &Device) -> anyhow::Result<Tensor<1>> {
    let (n, l) = (b.batch, b.len);
    let out = m.forward(input(b, d), ForwardFlags::default())?;
    let target = Tensor::<2>::from_data(TensorData::new(b.target.clone(), [n, l]), d);
    let keep = Tensor::<2, Bool>::from_data(TensorData::new(b.masked.clone(), [n, l]), d).float();
    Ok(((out.mlm_pred - target) * keep).square().sum())
}

impl GeneratorMasking {
    fn collate(batch: &Batch, opt: &CollateOptions) -> MlmBatch {
        collate_finetune(batch.cells, &FinetuneTokens { cls_value: 0.0, all_genes: None, mask_ratio: 0.3 }, opt)
    }
}

impl Task<TransformerGenerator> for GeneratorMasking {
    fn kind(&self) -> TaskKind {
        TaskKind::Pretrain
    }
    fn terms(&self) -> &[Term] {
        &self.terms
    }
    fn obs_cols(&self) -> Vec<String> {
        Vec::new()
    }
    fn prepare(&self, batch: &Batch, _step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>> {
        Ok(Box::new(Masked(Self::collate(batch, opt))))
    }
    fn loss(&self, model: &TransformerGenerator, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let b = &batch.as_any().downcast_ref::<Masked>().expect("a masked batch").0;
        let s = sq_sum(model, b, ctx.device)?;
        Ok(Loss { total: s.clone().mul_scalar(ctx.per_unit), terms: vec![Some(s.detach())] })
    }
    fn eval_width(&self) -> usize {
        2
    }
    fn eval_batch(
        &self,
        model: &TransformerGenerator,
        batch: &Batch,
        _index: u64,
        opt: &CollateOptions,
        d: &Device,
        sums: &mut [f64],
    ) -> anyhow::Result<()> {
        let b = Self::collate(batch, opt);
        sums[0] += sq_sum(model, &b, d)?.into_scalar::<f32>() as f64;
        sums[1] += b.masked_tokens() as f64;
        Ok(())
    }
    fn eval_finish(&self, sums: &[f64]) -> Evaluation {
        let mse = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
        Evaluation { scalars: mse.map(|m| vec![("valid/mse".to_string(), m)]).unwrap_or_default(), criterion: mse }
    }
}

fn build(_: &TrainConfig, _: &[ShardSet], _: &Path, _: bool) -> anyhow::Result<Box<dyn Task<TransformerGenerator>>> {
    Ok(Box::new(GeneratorMasking { terms: [Term { name: "mse", weight: 1.0, norm: Norm::Units }] }))
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(run: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.input=\"{}\"", root().join("tests/data/pbmc68k_reduced.h5ad").display()),
        "data.allow_non_integer=true".into(),
        "train.objective=\"mlm\"".into(),
        "model.MVC=false".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=64".into(),
        "model.dropout=0.0".into(),
        "train.batch_size=32".into(),
        "train.lr=2e-3".into(),
        "train.warmup_steps=2".into(),
        "train.epochs=2".into(),
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

fn params(t: &Trainer<TransformerGenerator>) -> Vec<f32> {
    flatten_params(t.model(), &list_params(t.model()).unwrap())
}

#[test]
fn a_task_on_the_perturbation_model_trains_resumes_and_exports_through_the_same_loop() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let mut ta = Trainer::<TransformerGenerator>::with_tasks(config(&a, &[]), Box::new(scgpt_dist::Single::new()), build).unwrap().quiet();
    let total = ta.total_steps();
    assert_eq!(ta.run().unwrap(), RunEnd::Finished { steps: total });
    let mse: Vec<f64> = metrics(&a).iter().filter_map(|l| l["train/loss_mse"].as_f64()).collect();
    assert!(mse.len() >= 3 && mse.last().unwrap() < &mse[0], "the loss falls: {mse:?}");
    assert_eq!(metrics(&a).iter().filter(|l| l.get("valid/mse").is_some()).count(), 2);

    // Resume mid-run: bit-identical.
    let cfg = |run: &Path| config(run, &["train.save_every=3", "train.grad_accum=2", "train.batch_size=16"]);
    let b = tmp.path().join("b");
    let mut t1 = Trainer::<TransformerGenerator>::with_tasks(cfg(&b), Box::new(scgpt_dist::Single::new()), build).unwrap().quiet();
    t1.run().unwrap();
    let c = tmp.path().join("c");
    let mut t2 = Trainer::<TransformerGenerator>::with_tasks(cfg(&c), Box::new(scgpt_dist::Single::new()), build).unwrap().quiet();
    let stop = t1.state.step / 2 + 1;
    assert_eq!(t2.run_until(Some(stop)).unwrap(), RunEnd::Interrupted { steps: stop, signal: 0 });
    drop(t2);
    let mut t2 = Trainer::<TransformerGenerator>::with_tasks(cfg(&c), Box::new(scgpt_dist::Single::new()), build).unwrap().quiet();
    t2.run().unwrap();
    let (want, got) = (params(&t1), params(&t2));
    assert_eq!(want.iter().zip(&got).filter(|(x, y)| x.to_bits() != y.to_bits()).count(), 0, "resume is exact");
    assert_eq!(t1.state, t2.state);

    // best/ is the native generator; best_model/ the tutorial's state_dict with its arguments.
    let dev = Device::flex();
    let (native, vocab) = scgpt_model::io::perturbation_checkpoint::load_native_perturbation(a.join("best"), &dev).unwrap();
    assert!(vocab.contains("<pad>"));
    let best = a.join("best_model");
    for f in ["best_model.pt", "perturbation_config.json", "vocab.json", "scgpt.json"] {
        assert!(best.join(f).is_file(), "best_model/{f} missing");
    }
    let config: scgpt_model::PerturbationConfig =
        serde_json::from_str(&std::fs::read_to_string(best.join("perturbation_config.json")).unwrap()).unwrap();
    assert_eq!(config, native.config);
    let mut reloaded = config.init(&dev).unwrap();
    let report = reloaded.load_checkpoint(best.join("best_model.pt")).unwrap();
    assert!(report.missing.is_empty() && report.skipped.is_empty(), "{report}");
    let (x, y) = (flatten_params(&native, &list_params(&native).unwrap()), flatten_params(&reloaded, &list_params(&reloaded).unwrap()));
    assert_eq!(x, y, "the exported state_dict holds the native weights");
}
