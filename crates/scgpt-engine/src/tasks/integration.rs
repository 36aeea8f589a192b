//! Batch integration (the original's Tutorial_Integration): masked values with the
//! fine-tuning tokenisation (`<cls>` with value 0, every gene of the data with
//! `include_zero_gene`, the exact-count mask of `random_mask_value` re-drawn each epoch), and
//! the tutorial's objective: GEP + GEPC, their zero-probability terms (`explicit_zero_prob`),
//! ECS and DAR, with DSBN or batch embeddings reading `data.batch_col`. Labels are never read.
//! Validation: the masked GEP MSE on fixed masks (the tutorial's best-model criterion) and the
//! DAR batch accuracy.

use scgpt_model::burn::tensor::Device;
use scgpt_model::{ForwardFlags, TransformerModel};

use super::expression::{expression_loss, terms, MaskedBatch};
use super::tensors::{bools, floats, masked_sq_sum, scalar, to_i64};
use super::{Batch, Evaluation, Loss, LossContext, MicroBatch, Task, Term};
use crate::collate::{collate_finetune, CollateOptions, FinetuneTokens};
use crate::config::{TaskKind, TrainConfig};

/// The value of `<cls>` in fine-tuning input (`tokenize_and_pad_batch`).
pub const CLS_VALUE: f32 = 0.0;

pub struct Integration {
    mask_ratio: f64,
    ecs: bool,
    include_zero_gene: bool,
    terms: Vec<Term>,
}

impl Integration {
    pub fn new(cfg: &TrainConfig) -> Self {
        let t = &cfg.train;
        Self::with(t.mask_ratio, t.ecs, cfg.task.include_zero_gene, t.ecs_weight, t.dab_weight)
    }

    pub fn with(mask_ratio: f64, ecs: bool, include_zero_gene: bool, ecs_weight: f64, dab_weight: f64) -> Self {
        Integration { mask_ratio, ecs, include_zero_gene, terms: terms(ecs_weight, dab_weight) }
    }

    /// The loss the task trains on one rank without accumulation (the tutorial's per-batch
    /// `loss`: masked MSE and zero-probability NLL means over the masked positions, ECS and
    /// the DAR cross entropy weighted), and each term's raw value (sums for the expression
    /// terms, in `Task::terms` order).
    pub fn mean_loss(&self, model: &TransformerModel, b: &MaskedBatch, device: &Device) -> anyhow::Result<Loss> {
        let mut single = scgpt_dist::Single::new();
        let mut ctx = LossContext { device, comm: &mut single, per_unit: 1.0 / b.0.masked_tokens().max(1) as f64, per_batch: 1.0 };
        self.loss(model, b, &mut ctx)
    }

    fn collate(&self, batch: &Batch, opt: &CollateOptions) -> anyhow::Result<MaskedBatch> {
        let ids = batch.batch_ids.map(<[i64]>::to_vec);
        anyhow::ensure!(ids.is_some(), "the integration task reads batch labels: set data.batch_col");
        let tokens =
            FinetuneTokens { cls_value: CLS_VALUE, all_genes: self.include_zero_gene.then_some(batch.genes), mask_ratio: self.mask_ratio };
        Ok(MaskedBatch(collate_finetune(batch.cells, &tokens, opt), ids))
    }
}

impl Task for Integration {
    fn kind(&self) -> TaskKind {
        TaskKind::Integration
    }
    fn terms(&self) -> &[Term] {
        &self.terms
    }
    fn obs_cols(&self) -> Vec<String> {
        Vec::new()
    }
    fn cls_value(&self) -> Option<f32> {
        Some(CLS_VALUE)
    }
    fn include_zero_gene(&self) -> bool {
        self.include_zero_gene
    }
    /// One batch leaves nothing to integrate.
    fn min_batch_labels(&self) -> usize {
        2
    }
    fn heads(&self) -> super::Heads {
        super::Heads::Expression
    }

    fn prepare(&self, batch: &Batch, _step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>> {
        Ok(Box::new(self.collate(batch, opt)?))
    }

    fn loss(&self, model: &TransformerModel, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let b = batch.as_any().downcast_ref::<MaskedBatch>().expect("an integration batch");
        let mut out =
            model.forward(b.input(model, ctx.device), ForwardFlags { mvc: model.config.do_mvc, ecs: self.ecs, ..Default::default() })?;
        let (total, terms) = expression_loss(&mut out, b, &self.terms, ctx);
        Ok(Loss { total, terms })
    }

    /// `[GEP squared error sum, masked positions, DAR correct, DAR cells]`.
    fn eval_width(&self) -> usize {
        4
    }

    fn eval_batch(
        &self,
        model: &TransformerModel,
        batch: &Batch,
        _index: u64,
        opt: &CollateOptions,
        d: &Device,
        sums: &mut [f64],
    ) -> anyhow::Result<()> {
        let b = self.collate(batch, opt)?;
        let (n, l) = (b.0.batch, b.0.len);
        let out = model.forward(b.input(model, d), ForwardFlags::default())?;
        sums[0] += scalar(&masked_sq_sum(out.mlm_output, floats(&b.0.target, n, l, d), bools(&b.0.masked, n, l, d).float()));
        sums[1] += b.0.masked_tokens() as f64;
        if let (Some(logits), Some(ids)) = (out.dab_output, &b.1) {
            let predicted = to_i64(logits.argmax(1).reshape([n]));
            sums[2] += predicted.iter().zip(ids).filter(|(p, t)| p == t).count() as f64;
            sums[3] += n as f64;
        }
        Ok(())
    }

    fn eval_finish(&self, sums: &[f64]) -> Evaluation {
        let mse = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
        let mut scalars: Vec<(String, f64)> = mse.map(|m| vec![("valid/mse".to_string(), m)]).unwrap_or_default();
        if sums[3] > 0.0 {
            scalars.push(("valid/dar_accuracy".into(), sums[2] / sums[3]));
        }
        Evaluation { scalars, criterion: mse }
    }
}
