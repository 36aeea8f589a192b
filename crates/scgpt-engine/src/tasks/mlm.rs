//! Masked-value pretraining (spec §2.5): the expression terms (GEP, GEPC, their zero
//! probabilities with `explicit_zero_prob`, ECS, DAR; see `expression`) on masked positions,
//! the optional CCE and a CLS term on `task.label_col`. Validation: masked MSE with fixed
//! masks, and CLS accuracy when the CLS term is on.

use scgpt_data::loader::ShardSet;
use scgpt_dist::Collective;
use scgpt_model::burn::tensor::{Device, Tensor, TensorData};
use scgpt_model::{ForwardFlags, TransformerModel};

use super::expression::{expression_loss, MaskedBatch};
use super::labels::Classes;
use super::tensors::{bools, cross_entropy, floats, masked_sq_sum, scalar, to_i64};
use super::{Batch, Evaluation, Loss, LossContext, MicroBatch, Norm, Task, Term};
use crate::collate::{collate_mlm, CollateOptions};
use crate::config::{TaskKind, TrainConfig};

pub struct Mlm {
    mask_ratio: f64,
    ecs: bool,
    cce: bool,
    /// The CLS term's classes and label column, when it is on.
    cls: Option<(Classes, String)>,
    terms: Vec<Term>,
}

impl Mlm {
    pub fn new(cfg: &TrainConfig, sets: &[ShardSet], saved: Option<Classes>) -> anyhow::Result<Self> {
        let t = &cfg.train;
        let cls = match cfg.label_col() {
            Some(col) => {
                let classes = match saved {
                    Some(c) => c,
                    None => Classes::scan_classes(sets, col, "task.label_col")?.0,
                };
                Some((classes, col.to_string()))
            }
            None => None,
        };
        let mut terms = super::expression::terms(t.ecs_weight, t.dab_weight);
        terms.push(Term { name: "cce", weight: t.cce_weight, norm: Norm::Batch });
        terms.push(Term { name: "cls", weight: t.cls_weight, norm: Norm::Batch });
        Ok(Mlm { mask_ratio: t.mask_ratio, ecs: t.ecs, cce: t.cce, cls, terms })
    }
}

/// CCE over every rank's cells: the other ranks' two views arrive as constants, this rank's
/// keep their gradients (the original's all-gather with local tensors put back).
fn gathered_cce(comm: &mut dyn Collective, c1: Tensor<2>, c2: Tensor<2>) -> anyhow::Result<Tensor<1>> {
    let [b, d] = c1.dims();
    let (world, rank) = (comm.world(), comm.rank());
    let mut sizes = vec![0f64; world];
    sizes[rank] = b as f64;
    comm.all_reduce_sum_f64(&mut sizes)?;
    let most = sizes.iter().fold(0f64, |a, &x| a.max(x)) as usize;
    let padded = |t: &Tensor<2>| {
        let mut v: Vec<f32> = t.clone().detach().into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
        v.resize(most * d, 0.0);
        v
    };
    let g1 = comm.all_gather(&padded(&c1))?;
    let g2 = comm.all_gather(&padded(&c2))?;
    let dev = c1.device();
    let assemble = |g: &[f32], local: Tensor<2>| {
        let mut parts = Vec::with_capacity(world);
        for (r, &n) in sizes.iter().enumerate() {
            let n = n as usize;
            if r == rank {
                parts.push(local.clone());
            } else if n > 0 {
                let at = r * most * d;
                parts.push(Tensor::<2>::from_data(TensorData::new(g[at..at + n * d].to_vec(), [n, d]), &dev));
            }
        }
        Tensor::cat(parts, 0)
    };
    let (all1, all2) = (assemble(&g1, c1), assemble(&g2, c2));
    Ok(scgpt_model::model::contrastive_loss(all1, all2, 0.5))
}

impl Task for Mlm {
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
        self.cls.iter().map(|(_, col)| col.clone()).collect()
    }
    fn classes(&self) -> Option<&[String]> {
        self.cls.as_ref().map(|(c, _)| c.names.as_slice())
    }
    fn run_files(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        match &self.cls {
            Some((c, _)) => Ok(vec![(super::labels::CLASSES_FILE.to_string(), c.to_json()?)]),
            None => Ok(Vec::new()),
        }
    }

    fn prepare(&self, batch: &Batch, _step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>> {
        let mut b = collate_mlm(batch.cells, self.mask_ratio, opt);
        if let (Some((classes, col)), Some(labels)) = (&self.cls, batch.obs.first()) {
            b.labels = classes.ids(labels, &format!("task.label_col = {col:?}"))?;
        }
        Ok(Box::new(MaskedBatch(b, batch.batch_ids.map(<[i64]>::to_vec))))
    }

    fn loss(&self, model: &TransformerModel, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let mb = batch.as_any().downcast_ref::<MaskedBatch>().expect("an mlm batch");
        let b = &mb.0;
        let cls = self.cls.is_some() && !b.labels.is_empty();
        let mut out = model.forward(
            mb.input(model, ctx.device),
            ForwardFlags { mvc: model.config.do_mvc, ecs: self.ecs, cce: self.cce, cls, ..Default::default() },
        )?;
        let (mut total, mut terms) = expression_loss(&mut out, mb, &self.terms, ctx);
        terms.extend([None, None]);
        if let Some(local) = out.loss_cce {
            // Across ranks the contrast runs over the global batch, as the original's
            // all-gather does; × world so the averaged gradient is the one-process gradient.
            let world = ctx.comm.world();
            let (cce, factor) = match out.cce_views {
                Some((c1, c2)) if world > 1 => (gathered_cce(ctx.comm, c1, c2)?, world as f64),
                _ => (local, 1.0),
            };
            terms[6] = Some(cce.clone().detach());
            total = total + cce.mul_scalar(self.terms[6].weight * ctx.per_batch * factor);
        }
        if let Some(logits) = out.cls_output {
            let ce = cross_entropy(logits, &b.labels, ctx.device);
            terms[7] = Some(ce.clone().detach());
            total = total + ce.mul_scalar(self.terms[7].weight * ctx.per_batch);
        }
        Ok(Loss { total, terms })
    }

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
        let mut b = collate_mlm(batch.cells, self.mask_ratio, opt);
        if let (Some((classes, col)), Some(labels)) = (&self.cls, batch.obs.first()) {
            b.labels = classes.ids(labels, &format!("task.label_col = {col:?}"))?;
        }
        let (n, l) = (b.batch, b.len);
        let cls = !b.labels.is_empty();
        let b = MaskedBatch(b, batch.batch_ids.map(<[i64]>::to_vec));
        let out = model.forward(b.input(model, d), ForwardFlags { cls, ..Default::default() })?;
        let b = b.0;
        if let Some(logits) = out.cls_output.clone() {
            let predicted = to_i64(logits.argmax(1).reshape([n]));
            sums[2] += predicted.iter().zip(&b.labels).filter(|(p, l)| p == l).count() as f64;
            sums[3] += b.labels.len() as f64;
        }
        sums[0] += scalar(&masked_sq_sum(out.mlm_output, floats(&b.target, n, l, d), bools(&b.masked, n, l, d).float()));
        sums[1] += b.masked_tokens() as f64;
        Ok(())
    }

    fn eval_finish(&self, sums: &[f64]) -> Evaluation {
        let mse = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
        let mut scalars: Vec<(String, f64)> = mse.map(|m| vec![("valid/mse".to_string(), m)]).unwrap_or_default();
        if sums[3] > 0.0 {
            scalars.push(("valid/cls_accuracy".into(), sums[2] / sums[3]));
        }
        Evaluation { scalars, criterion: mse }
    }
}
