//! Cell-type annotation (the original's Tutorial_Annotation): the CLS head (`n_layers_cls`)
//! on the `<cls>` output, cross entropy only, no masking. Cells are tokenised as the
//! tutorial's `tokenize_and_pad_batch` with `include_zero_gene=False`: `<cls>` with value 0,
//! the nonzero genes binned per cell, long cells randomly subsampled to `max_seq_len`.
//! Validation: cross entropy (the tutorial's best-model criterion), accuracy and macro F1.

use std::any::Any;

use scgpt_data::loader::ShardSet;
use scgpt_model::burn::tensor::{Device, Tensor};
use scgpt_model::{ForwardFlags, ModelInput, TransformerModel};

use super::labels::{balanced_weights, Classes, CLASSES_FILE};
use super::tensors::{batch_labels, bools, cross_entropy_sum, floats, ints, scalar, to_i64};
use super::{full_attention_flops, real_tokens, Batch, Evaluation, Loss, LossContext, MicroBatch, ModelShape, Norm, Task, Term};
use crate::collate::{collate_classify, ClassifyBatch, CollateOptions};
use crate::config::{ClassWeight, TaskKind, TrainConfig};

/// The value of `<cls>` in fine-tuning input (`tokenize_and_pad_batch`; `embed_data` uses −2).
pub const CLS_VALUE: f32 = 0.0;

pub struct Annotation {
    classes: Classes,
    label_col: String,
    /// Per-class loss weights (`class_weight = "balanced"`).
    weights: Option<Vec<f32>>,
    /// The labels read, `[set][shard][row]`.
    labels: Vec<Vec<Vec<String>>>,
    terms: [Term; 1],
}

/// The loss the task trains on one rank without accumulation: cross entropy averaged over the
/// batch's cells, each weighted by its class's weight when given (PyTorch's
/// `CrossEntropyLoss()` for `None`).
pub fn mean_loss(model: &TransformerModel, b: &ClassifyBatch, weights: Option<&[f32]>, d: &Device) -> anyhow::Result<Tensor<1>> {
    Ok(cross_entropy_sum(Annotation::logits(model, b, d)?, &b.labels, weights, d).div_scalar(b.batch.max(1) as f64))
}

/// A collated batch and its cells' batch-label ids.
struct Prepared(ClassifyBatch, Option<Vec<i64>>);

impl Annotation {
    pub fn new(cfg: &TrainConfig, sets: &[ShardSet], saved: Option<Classes>) -> anyhow::Result<Self> {
        let col = cfg.task.label_col.clone();
        let (scanned, labels) = Classes::scan_classes(sets, &col, "task.label_col")?;
        let classes = saved.unwrap_or(scanned);
        let weights = match cfg.task.class_weight {
            ClassWeight::None => None,
            ClassWeight::Balanced => Some(balanced_weights(&classes.counts(labels.iter().flatten().flatten()))),
        };
        Ok(Annotation { classes, label_col: col, weights, labels, terms: [Term { name: "cls", weight: 1.0, norm: Norm::Units }] })
    }

    fn collate(&self, batch: &Batch, opt: &CollateOptions) -> anyhow::Result<ClassifyBatch> {
        let mut b = collate_classify(batch.cells, CLS_VALUE, opt);
        let labels = batch.obs.first().map(Vec::as_slice).unwrap_or_default();
        anyhow::ensure!(labels.len() == b.batch, "task.label_col = {:?}: the loader returned no labels", self.label_col);
        b.labels = self.classes.ids(labels, &format!("task.label_col = {:?}", self.label_col))?;
        Ok(b)
    }

    /// The CLS head's logits `[B, n_cls]` for a collated batch.
    pub fn logits(model: &TransformerModel, b: &ClassifyBatch, d: &Device) -> anyhow::Result<Tensor<2>> {
        Self::logits_with(model, b, &None, d)
    }

    fn logits_with(model: &TransformerModel, b: &ClassifyBatch, batch_ids: &Option<Vec<i64>>, d: &Device) -> anyhow::Result<Tensor<2>> {
        let (n, l) = (b.batch, b.len);
        let input = ModelInput {
            src: ints(&b.genes, n, l, d),
            values: floats(&b.values, n, l, d),
            src_key_padding_mask: bools(&b.pad, n, l, d),
            batch_labels: batch_labels(batch_ids, d),
        };
        let out = model.forward(input, ForwardFlags { cls: true, ..Default::default() })?;
        Ok(out.cls_output.expect("cls flag set"))
    }
}

impl MicroBatch for Prepared {
    /// Cross entropy is averaged over the step's cells.
    fn units(&self) -> usize {
        self.0.batch
    }
    fn input_tokens(&self) -> usize {
        real_tokens(&self.0.pad)
    }
    fn encoder_flops(&self, shape: ModelShape) -> f64 {
        full_attention_flops(shape, self.0.batch, self.0.len)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Task for Annotation {
    fn kind(&self) -> TaskKind {
        TaskKind::Annotation
    }
    fn terms(&self) -> &[Term] {
        &self.terms
    }
    fn obs_cols(&self) -> Vec<String> {
        vec![self.label_col.clone()]
    }
    fn classes(&self) -> Option<&[String]> {
        Some(&self.classes.names)
    }
    fn cell_labels(&self) -> Option<&[Vec<Vec<String>>]> {
        Some(&self.labels)
    }
    fn heads(&self) -> super::Heads {
        super::Heads::Classifier
    }
    fn cls_value(&self) -> Option<f32> {
        Some(CLS_VALUE)
    }
    fn run_files(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![(CLASSES_FILE.to_string(), self.classes.to_json()?)])
    }

    fn prepare(&self, batch: &Batch, _step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>> {
        Ok(Box::new(Prepared(self.collate(batch, opt)?, batch.batch_ids.map(<[i64]>::to_vec))))
    }

    fn loss(&self, model: &TransformerModel, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let Prepared(b, ids) = batch.as_any().downcast_ref::<Prepared>().expect("an annotation batch");
        let logits = Self::logits_with(model, b, ids, ctx.device)?;
        let ce = cross_entropy_sum(logits, &b.labels, self.weights.as_deref(), ctx.device);
        Ok(Loss { total: ce.clone().mul_scalar(ctx.per_unit), terms: vec![Some(ce.detach())] })
    }

    /// `[ce sum, correct, cells]`, then per class: true positives, predicted, true.
    fn eval_width(&self) -> usize {
        3 + 3 * self.classes.len()
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
        let logits = Self::logits_with(model, &b, &batch.batch_ids.map(<[i64]>::to_vec), d)?;
        sums[0] += scalar(&cross_entropy_sum(logits.clone(), &b.labels, None, d));
        let predicted = to_i64(logits.argmax(1).reshape([b.batch]));
        let k = self.classes.len();
        for (&p, &t) in predicted.iter().zip(&b.labels) {
            let (p, t) = (p as usize, t as usize);
            if p == t {
                sums[1] += 1.0;
                sums[3 + p] += 1.0;
            }
            sums[3 + k + p] += 1.0;
            sums[3 + 2 * k + t] += 1.0;
        }
        sums[2] += b.batch as f64;
        Ok(())
    }

    fn eval_finish(&self, sums: &[f64]) -> Evaluation {
        if sums[2] == 0.0 {
            return Evaluation::default();
        }
        let k = self.classes.len();
        // Macro F1 over the classes that occur in truth or prediction, as scikit-learn's.
        let mut f1s = Vec::new();
        for c in 0..k {
            let (tp, predicted, truth) = (sums[3 + c], sums[3 + k + c], sums[3 + 2 * k + c]);
            if predicted + truth > 0.0 {
                f1s.push(2.0 * tp / (predicted + truth));
            }
        }
        let ce = sums[0] / sums[2];
        let scalars = vec![
            ("valid/loss_cls".to_string(), ce),
            ("valid/accuracy".to_string(), sums[1] / sums[2]),
            ("valid/macro_f1".to_string(), f1s.iter().sum::<f64>() / f1s.len().max(1) as f64),
        ];
        Evaluation { scalars, criterion: Some(ce) }
    }
}
