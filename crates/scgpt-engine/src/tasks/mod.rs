//! What a run trains. The loop in `trainer.rs` names no task: a task turns loader batches into
//! model inputs, computes its named loss terms, scores validation batches and says which
//! validation number keeps `best_model/`. One file per task; a new task touches nothing else
//! but [`build`].
//!
//! Normalisation: a term is either a sum over the step's *units* (target tokens for the
//! expression objectives, cells for classification) divided by the units of the whole step
//! (all micro-batches, all ranks), or a per-micro-batch mean divided by the micro-batches of
//! the step. Either way one rank = N ranks = accumulation.

use std::any::Any;
use std::path::Path;

use scgpt_data::loader::ShardSet;
use scgpt_dist::Collective;
use scgpt_model::burn::tensor::{Device, Tensor};
use scgpt_model::TransformerModel;

use crate::collate::{Cell, CollateOptions};
use crate::config::{Objective, TaskKind, TrainConfig};

pub mod annotation;
pub mod expression;
pub mod generative;
pub mod integration;
pub mod labels;
pub mod mlm;
pub mod perturbation;

pub(crate) mod tensors;

/// How a loss term is averaged over an optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// A sum over units, divided by the step's units.
    Units,
    /// A micro-batch mean, divided by the step's micro-batches.
    Batch,
}

/// A named loss term: logged as `train/loss_{name}`, weighted into `train/loss`.
#[derive(Debug, Clone, Copy)]
pub struct Term {
    pub name: &'static str,
    pub weight: f64,
    pub norm: Norm,
}

/// The sizes the engine's FLOP count needs.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub d: usize,
    pub d_hid: usize,
    pub layers: usize,
}

/// Encoder FLOPs of one training step (forward + backward = 3 × forward) over `tokens`
/// tokens and `scores` attention scores, on the padded shapes the device computes: per layer
/// and token 2·(4d² + 2d·d_hid) for the projections and feed-forward, plus 4d per score (QKᵀ
/// and the weighted sum of V). Heads and embeddings are left out, as model-FLOP counts usually
/// do.
pub fn encoder_flops(shape: ModelShape, tokens: f64, scores: f64, passes: f64) -> f64 {
    let (d, d_hid, layers) = (shape.d as f64, shape.d_hid as f64, shape.layers as f64);
    let per_token = 2.0 * (4.0 * d * d + 2.0 * d * d_hid);
    3.0 * passes * layers * (tokens * per_token + scores * 4.0 * d)
}

/// Encoder FLOPs of a `[batch, len]` token batch where every token attends to every token
/// (masked values, classification).
pub fn full_attention_flops(shape: ModelShape, batch: usize, len: usize) -> f64 {
    let (n, l) = (batch as f64, len as f64);
    encoder_flops(shape, n * l, n * l * l, 1.0)
}

/// Non-padding tokens of a padding mask.
pub fn real_tokens(pad: &[bool]) -> usize {
    pad.iter().filter(|p| !**p).count()
}

/// A collated micro-batch; only the task that made it reads its contents.
pub trait MicroBatch: Send {
    /// Units of the task's `Norm::Units` terms in this batch.
    fn units(&self) -> usize;
    /// Non-padding input tokens (throughput).
    fn input_tokens(&self) -> usize;
    fn encoder_flops(&self, shape: ModelShape) -> f64;
    fn as_any(&self) -> &dyn Any;
}

/// What a loss needs besides the model and the batch.
pub struct LossContext<'a> {
    pub device: &'a Device,
    pub comm: &'a mut dyn Collective,
    /// Multiplies a `Norm::Units` sum: world / (the step's units over all ranks).
    pub per_unit: f64,
    /// Multiplies a `Norm::Batch` mean: 1 / (the step's micro-batches on this rank).
    pub per_batch: f64,
}

/// The weighted, normalised loss to differentiate, and each term's raw (unnormalised,
/// detached) value in `Task::terms` order; `None` for a term this batch did not compute.
pub struct Loss {
    pub total: Tensor<1>,
    pub terms: Vec<Option<Tensor<1>>>,
}

/// A validation pass's result, after the per-batch sums were added over ranks.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub scalars: Vec<(String, f64)>,
    /// The number `best_model/` is kept by (lower is better); `None` when this pass had
    /// nothing to score.
    pub criterion: Option<f64>,
}

/// A loader batch in the model's vocabulary.
pub struct Batch<'a> {
    pub cells: &'a [Cell],
    /// The task's obs columns (`Task::obs_cols` order), one value per cell.
    pub obs: &'a [Vec<String>],
    /// Batch-label ids of the cells (`data.batch_col`), when the model reads them.
    pub batch_ids: Option<&'a [i64]>,
    /// Every gene of the run's data in model ids, ascending: the tokens of each cell under
    /// `include_zero_gene`.
    pub genes: &'a [u32],
}

/// Which heads the task's model carries, whatever the checkpoint it starts from had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// Pretraining: the `[model]` section (or the checkpoint being continued) decides.
    Pretrain,
    /// A classifier: the CLS head alone (`n_layers_cls`, `cell_emb_style` from the config).
    Classifier,
    /// Expression fine-tuning: GEPC, DAR, zero probabilities and the ECS threshold as the
    /// config's `[model]` section says.
    Expression,
}

/// A task trains the model `M` behind it (`TransformerModel` unless it says otherwise).
pub trait Task<M = TransformerModel>: Send {
    fn kind(&self) -> TaskKind;
    /// The loss terms, in the order `Loss::terms` reports them.
    fn terms(&self) -> &[Term];
    /// obs columns the loader must carry with each cell.
    fn obs_cols(&self) -> Vec<String>;
    /// Classes of a classification head (the model's `n_cls`), if the task has one.
    fn classes(&self) -> Option<&[String]> {
        None
    }
    /// Every cell's label as the task read it, `[set][shard][row]` over the sets it was built
    /// with (training sets first), for a stratified validation split.
    fn cell_labels(&self) -> Option<&[Vec<Vec<String>>]> {
        None
    }
    /// Files the run directory and `best_model/` keep for this task (name, contents).
    fn run_files(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }
    /// Whether the model is built with the generative flag encoder.
    fn generative_model(&self) -> bool {
        false
    }
    fn heads(&self) -> Heads {
        Heads::Pretrain
    }
    /// The value `<cls>` carries in the input; `None` = `model.pad_value` (pretraining).
    fn cls_value(&self) -> Option<f32> {
        None
    }
    /// Distinct batch labels the data must hold for the task to make sense (integration: 2).
    fn min_batch_labels(&self) -> usize {
        0
    }
    /// Cells are tokenised with every gene of the data, zeros included.
    fn include_zero_gene(&self) -> bool {
        false
    }
    /// The run validates embeddings on `valid.label_set` (kNN accuracy, ASW), as pretraining
    /// does; fine-tuning tasks validate themselves.
    fn embedding_metrics(&self) -> bool {
        false
    }
    /// The cells reach the task in their data set's vocabulary ids (every gene of the data
    /// kept, whatever the model's vocabulary holds), not the model's: the task maps genes to
    /// tokens itself (perturbation: genes outside the vocabulary are `<pad>` tokens).
    fn cells_in_data_ids(&self) -> bool {
        false
    }
    /// Called once the model's vocabulary is known (fresh, `init_from` or resumed); returns
    /// notes for the run's log.
    fn bind_vocab(&mut self, _vocab: &scgpt_data::vocab::GeneVocab) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Collates a training micro-batch of optimiser step `step`.
    fn prepare(&self, batch: &Batch, step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>>;
    fn loss(&self, model: &M, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss>;
    /// Length of the per-batch validation sums.
    fn eval_width(&self) -> usize;
    /// Scores validation batch `index` (fixed draws in `opt`) into `sums`.
    fn eval_batch(
        &self,
        model: &M,
        batch: &Batch,
        index: u64,
        opt: &CollateOptions,
        device: &Device,
        sums: &mut [f64],
    ) -> anyhow::Result<()>;
    /// Turns the sums over all ranks into scalars and the criterion.
    fn eval_finish(&self, sums: &[f64]) -> Evaluation;
}

/// The task a config asks for. `resume` is the checkpoint directory a resumed run starts from:
/// a task with classes takes them from the run directory then, so the head keeps its meaning.
pub fn build(cfg: &TrainConfig, sets: &[ShardSet], run_dir: &Path, resuming: bool) -> anyhow::Result<Box<dyn Task>> {
    let saved = if resuming { labels::Classes::load(run_dir)? } else { None };
    Ok(match cfg.task.kind {
        TaskKind::Pretrain => match cfg.train.objective {
            Objective::Generative => Box::new(generative::Generative::new(cfg)),
            Objective::Mlm => Box::new(mlm::Mlm::new(cfg, sets, saved)?),
        },
        TaskKind::Annotation => Box::new(annotation::Annotation::new(cfg, sets, saved)?),
        TaskKind::Integration => Box::new(integration::Integration::new(cfg)),
        TaskKind::Perturbation => anyhow::bail!("task.kind = \"perturbation\" trains the perturbation model: run it with Trainer::<TransformerGenerator>::perturbation (scgpt-train does)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_flops_count_projections_feed_forward_and_scores() {
        // d 4, d_hid 8, 1 layer: 2·(4·16 + 2·32) = 256 per token × 20 tokens, 4·4 per score ×
        // 2·10² scores, × 3 for forward + backward.
        let shape = ModelShape { d: 4, d_hid: 8, layers: 1 };
        assert_eq!(full_attention_flops(shape, 2, 10), 3.0 * (20.0 * 256.0 + 200.0 * 16.0));
    }
}
