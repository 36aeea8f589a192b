//! The expression objectives the masked-value tasks share (`mlm`, `integration`): GEP and
//! GEPC on the masked positions, their zero-probability terms (`explicit_zero_prob`: the
//! negative log-likelihood of "expressed" under the predicted Bernoulli), ECS on the cell
//! embeddings and DAR (the batch classifier behind gradient reversal).

use std::any::Any;

use scgpt_model::burn::tensor::{Device, Tensor};
use scgpt_model::{ModelInput, ModelOutput, TransformerModel};

use super::tensors::{batch_labels, bools, cross_entropy, floats, ints, masked_sq_sum, neg_log_bernoulli_sum};
use super::{full_attention_flops, real_tokens, LossContext, MicroBatch, ModelShape, Norm, Term};
use crate::collate::MlmBatch;

/// The six terms, in the order [`expression_loss`] reports them.
pub fn terms(ecs_weight: f64, dab_weight: f64) -> Vec<Term> {
    vec![
        Term { name: "gep", weight: 1.0, norm: Norm::Units },
        Term { name: "gep_zero", weight: 1.0, norm: Norm::Units },
        Term { name: "gepc", weight: 1.0, norm: Norm::Units },
        Term { name: "gepc_zero", weight: 1.0, norm: Norm::Units },
        Term { name: "ecs", weight: ecs_weight, norm: Norm::Batch },
        Term { name: "dar", weight: dab_weight, norm: Norm::Batch },
    ]
}

/// A collated masked-value batch and its cells' batch-label ids.
pub struct MaskedBatch(pub MlmBatch, pub Option<Vec<i64>>);

impl MaskedBatch {
    /// The model's input; batch labels go in only when the model reads them (DSBN, batch
    /// embeddings): DAR alone needs them for its loss, not in the forward.
    pub fn input(&self, model: &TransformerModel, d: &Device) -> ModelInput {
        let (b, ids) = (&self.0, &self.1);
        let (n, l) = (b.batch, b.len);
        let c = &model.config;
        let reads = c.use_batch_labels || c.domain_spec_batchnorm != scgpt_model::BatchNormStyle::None;
        let ids = if reads { ids.clone() } else { None };
        ModelInput {
            src: ints(&b.genes, n, l, d),
            values: floats(&b.values, n, l, d),
            src_key_padding_mask: bools(&b.pad, n, l, d),
            batch_labels: batch_labels(&ids, d),
        }
    }
}

impl MicroBatch for MaskedBatch {
    /// Expression terms are averaged over the step's masked positions.
    fn units(&self) -> usize {
        self.0.masked_tokens()
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

/// The weighted, normalised sum of the terms the model's output holds, and each term's raw
/// value (`None` for a head the model lacks). `out` is taken apart; the caller keeps nothing
/// of it but what it reads before.
pub fn expression_loss(out: &mut ModelOutput, b: &MaskedBatch, terms: &[Term], ctx: &LossContext) -> (Tensor<1>, Vec<Option<Tensor<1>>>) {
    let d = ctx.device;
    let (n, l) = (b.0.batch, b.0.len);
    let target = floats(&b.0.target, n, l, d);
    let keep = bools(&b.0.masked, n, l, d).float();
    let mut raw: Vec<Option<Tensor<1>>> = vec![None; 6];
    let gep = masked_sq_sum(out.mlm_output.clone(), target.clone(), keep.clone());
    raw[0] = Some(gep.clone().detach());
    let mut units = gep;
    if let Some(p) = out.mlm_zero_probs.take() {
        let z = neg_log_bernoulli_sum(p, target.clone(), keep.clone());
        raw[1] = Some(z.clone().detach());
        units = units + z;
    }
    if let Some(m) = out.mvc_output.take() {
        let gepc = masked_sq_sum(m, target.clone(), keep.clone());
        raw[2] = Some(gepc.clone().detach());
        units = units + gepc;
    }
    if let Some(p) = out.mvc_zero_probs.take() {
        let z = neg_log_bernoulli_sum(p, target, keep);
        raw[3] = Some(z.clone().detach());
        units = units + z;
    }
    let mut total = units.mul_scalar(ctx.per_unit);
    if let Some(ecs) = out.loss_ecs.take() {
        raw[4] = Some(ecs.clone().detach());
        total = total + ecs.mul_scalar(terms[4].weight * ctx.per_batch);
    }
    if let (Some(logits), Some(ids)) = (out.dab_output.take(), &b.1) {
        let ce = cross_entropy(logits, ids, d);
        raw[5] = Some(ce.clone().detach());
        total = total + ce.mul_scalar(terms[5].weight * ctx.per_batch);
    }
    (total, raw)
}
