//! The original's generative pretraining (spec §2): per step a gen share from `gen_ratios`,
//! pass 1 gene-prompted (GEP + GEPC on gen tokens), pass 2 cell-prompted (the `<cls>` input
//! replaced by pass 1's detached cell embedding: GEP on gen tokens). Validation: masked MSE on
//! gen tokens with fixed draws.

use std::any::Any;

use scgpt_model::burn::tensor::Device;
use scgpt_model::{ForwardFlags, GenerativeInput, TransformerModel};

use super::tensors::{batch_labels, bools, floats, ints, masked_sq_sum, scalar};
use super::{encoder_flops, Batch, Evaluation, Loss, LossContext, MicroBatch, ModelShape, Norm, Task, Term};
use crate::collate::{collate_generative, gen_ratio_for, CollateOptions, GenerativeBatch};
use crate::config::{TaskKind, TrainConfig};

pub struct Generative {
    seed: u64,
    gen_ratios: Vec<f64>,
    cell_prompt_pass: bool,
    terms: Vec<Term>,
}

impl Generative {
    pub fn new(cfg: &TrainConfig) -> Self {
        // A term a batch does not compute (GEPC without an MVC head) is reported as absent.
        let terms = ["gep", "gepc", "cell_prompt"].map(|name| Term { name, weight: 1.0, norm: Norm::Units }).to_vec();
        Generative { seed: cfg.run.seed, gen_ratios: cfg.train.gen_ratios.clone(), cell_prompt_pass: cfg.train.cell_prompt_pass, terms }
    }
}

struct Prepared {
    batch: GenerativeBatch,
    cell_prompt_pass: bool,
    batch_ids: Option<Vec<i64>>,
}

impl MicroBatch for Prepared {
    fn units(&self) -> usize {
        self.batch.gen_tokens()
    }
    fn input_tokens(&self) -> usize {
        let b = &self.batch;
        b.pcpt_pad.iter().chain(&b.gen_pad).filter(|p| !**p).count()
    }
    /// pcpt tokens attend to P keys, gen tokens to P + 1, twice with the cell-prompted pass.
    fn encoder_flops(&self, shape: ModelShape) -> f64 {
        let b = &self.batch;
        let (n, p, g) = (b.batch as f64, b.pcpt_len as f64, b.gen_len as f64);
        encoder_flops(shape, n * (p + g), n * (p * p + g * (p + 1.0)), if self.cell_prompt_pass { 2.0 } else { 1.0 })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A collated generative batch as model input (no gen mask when nothing is padded).
fn generative_input(b: &GenerativeBatch, batch_ids: &Option<Vec<i64>>, d: &Device) -> GenerativeInput {
    let (n, p, g) = (b.batch, b.pcpt_len, b.gen_len);
    GenerativeInput {
        pcpt_genes: ints(&b.pcpt_genes, n, p, d),
        pcpt_values: floats(&b.pcpt_values, n, p, d),
        pcpt_key_padding_mask: bools(&b.pcpt_pad, n, p, d),
        gen_genes: Some(ints(&b.gen_genes, n, g, d)),
        gen_key_padding_mask: b.gen_pad.contains(&true).then(|| bools(&b.gen_pad, n, g, d)),
        batch_labels: batch_labels(batch_ids, d),
        input_cell_emb: None,
    }
}

impl Task for Generative {
    fn kind(&self) -> TaskKind {
        TaskKind::Pretrain
    }
    fn embedding_metrics(&self) -> bool {
        true
    }
    fn terms(&self) -> &[Term] {
        &self.terms
    }
    fn obs_cols(&self) -> Vec<String> {
        Vec::new()
    }
    fn generative_model(&self) -> bool {
        true
    }

    fn prepare(&self, batch: &Batch, step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>> {
        // The gen share is one per optimiser step: the same on every rank and micro-batch.
        let ratio = gen_ratio_for(self.seed, step, &self.gen_ratios);
        Ok(Box::new(Prepared {
            batch: collate_generative(batch.cells, ratio, opt),
            cell_prompt_pass: self.cell_prompt_pass,
            batch_ids: batch.batch_ids.map(<[i64]>::to_vec),
        }))
    }

    fn loss(&self, model: &TransformerModel, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let prepared = batch.as_any().downcast_ref::<Prepared>().expect("a generative batch");
        let b = &prepared.batch;
        let d = ctx.device;
        let (n, p, g) = (b.batch, b.pcpt_len, b.gen_len);
        let input = generative_input(b, &prepared.batch_ids, d);
        let target = floats(&b.gen_target, n, g, d);
        let keep = bools(&b.gen_pad, n, g, d).bool_not().float();
        let mvc = model.config.do_mvc;
        let out = model.generative_forward(input.clone(), ForwardFlags { mvc, ..Default::default() })?;
        let gep = masked_sq_sum(out.gen_preds.clone().expect("gen preds"), target.clone(), keep.clone());
        let mut total = gep.clone();
        let mut terms = vec![Some(gep.detach()), None, None];
        if let Some(m) = out.mvc_output.clone() {
            let gepc = masked_sq_sum(m.slice([0..n, p..p + g]), target.clone(), keep.clone());
            terms[1] = Some(gepc.clone().detach());
            total = total + gepc;
        }
        if self.cell_prompt_pass {
            let second = GenerativeInput { input_cell_emb: Some(out.cell_emb.detach()), ..input };
            let out2 = model.generative_forward(second, ForwardFlags::default())?;
            let gen = masked_sq_sum(out2.gen_preds.expect("gen preds"), target, keep);
            terms[2] = Some(gen.clone().detach());
            total = total + gen;
        }
        Ok(Loss { total: total.mul_scalar(ctx.per_unit), terms })
    }

    fn eval_width(&self) -> usize {
        2
    }

    fn eval_batch(
        &self,
        model: &TransformerModel,
        batch: &Batch,
        index: u64,
        opt: &CollateOptions,
        d: &Device,
        sums: &mut [f64],
    ) -> anyhow::Result<()> {
        let ratio = gen_ratio_for(opt.draw_seed, index, &self.gen_ratios);
        let b = collate_generative(batch.cells, ratio, opt);
        let (n, g) = (b.batch, b.gen_len);
        if b.gen_tokens() == 0 {
            return Ok(());
        }
        let out = model.generative_forward(generative_input(&b, &batch.batch_ids.map(<[i64]>::to_vec), d), ForwardFlags::default())?;
        let keep = bools(&b.gen_pad, n, g, d).bool_not().float();
        sums[0] += scalar(&masked_sq_sum(out.gen_preds.expect("gen"), floats(&b.gen_target, n, g, d), keep));
        sums[1] += b.gen_tokens() as f64;
        Ok(())
    }

    fn eval_finish(&self, sums: &[f64]) -> Evaluation {
        let mse = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
        Evaluation { scalars: mse.map(|m| vec![("valid/mse".to_string(), m)]).unwrap_or_default(), criterion: mse }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_flops_count_both_passes() {
        let b = GenerativeBatch {
            batch: 1,
            pcpt_len: 3,
            gen_len: 2,
            gen_ratio: 0.5,
            pcpt_genes: vec![],
            pcpt_values: vec![],
            pcpt_pad: vec![],
            gen_genes: vec![],
            gen_target: vec![],
            gen_pad: vec![],
        };
        let shape = ModelShape { d: 4, d_hid: 8, layers: 2 };
        // d 4, d_hid 8: 2·(4·16 + 2·32) = 256 per token × 5 tokens; 3² pcpt scores + 2 gen
        // queries × (3 + 1) keys = 17 at 4·4 each; two passes, 2 layers, × 3 for backward.
        let one_pass = 5.0 * 256.0 + 17.0 * 16.0;
        let two = Prepared { batch: b.clone(), cell_prompt_pass: true, batch_ids: None };
        assert_eq!(two.encoder_flops(shape), 3.0 * 2.0 * 2.0 * one_pass);
        let one = Prepared { batch: b, cell_prompt_pass: false, batch_ids: None };
        assert_eq!(one.encoder_flops(shape), 3.0 * 2.0 * one_pass);
    }
}
