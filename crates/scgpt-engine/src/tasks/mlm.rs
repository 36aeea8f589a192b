//! Masked-value pretraining (spec §2.5): GEP (+ GEPC) on masked positions, with the optional
//! per-batch ECS and CCE terms and a CLS term on `task.label_col`. Validation: masked MSE with
//! fixed masks, and CLS accuracy when the CLS term is on.

use std::any::Any;

use scgpt_data::loader::ShardSet;
use scgpt_dist::Collective;
use scgpt_model::burn::tensor::{Device, Tensor, TensorData};
use scgpt_model::{ForwardFlags, ModelInput, TransformerModel};

use super::labels::Classes;
use super::tensors::{batch_labels, bools, cross_entropy, floats, ints, masked_sq_sum, scalar, to_i64};
use super::{full_attention_flops, real_tokens, Batch, Evaluation, Loss, LossContext, MicroBatch, ModelShape, Norm, Task, Term};
use crate::collate::{collate_mlm, CollateOptions, MlmBatch};
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
        let terms = vec![
            Term { name: "gep", weight: 1.0, norm: Norm::Units },
            Term { name: "gepc", weight: 1.0, norm: Norm::Units },
            Term { name: "ecs", weight: t.ecs_weight, norm: Norm::Batch },
            Term { name: "cce", weight: t.cce_weight, norm: Norm::Batch },
            Term { name: "cls", weight: t.cls_weight, norm: Norm::Batch },
        ];
        Ok(Mlm { mask_ratio: t.mask_ratio, ecs: t.ecs, cce: t.cce, cls, terms })
    }

    fn input(b: &MlmBatch, batch_ids: &Option<Vec<i64>>, d: &Device) -> ModelInput {
        let (n, l) = (b.batch, b.len);
        ModelInput { src: ints(&b.genes, n, l, d), values: floats(&b.values, n, l, d), src_key_padding_mask: bools(&b.pad, n, l, d), batch_labels: batch_labels(batch_ids, d) }
    }
}

/// A collated batch and its cells' batch-label ids.
struct Prepared(MlmBatch, Option<Vec<i64>>);

impl MicroBatch for Prepared {
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
        Ok(Box::new(Prepared(b, batch.batch_ids.map(<[i64]>::to_vec))))
    }

    fn loss(&self, model: &TransformerModel, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let Prepared(b, ids) = batch.as_any().downcast_ref::<Prepared>().expect("an mlm batch");
        let d = ctx.device;
        let (n, l) = (b.batch, b.len);
        let target = floats(&b.target, n, l, d);
        let keep = bools(&b.masked, n, l, d).float();
        let cls = self.cls.is_some() && !b.labels.is_empty();
        let out = model.forward(Self::input(b, ids, d), ForwardFlags { mvc: model.config.do_mvc, ecs: self.ecs, cce: self.cce, cls, ..Default::default() })?;
        let gep = masked_sq_sum(out.mlm_output, target.clone(), keep.clone());
        let mut terms: Vec<Option<Tensor<1>>> = vec![Some(gep.clone().detach()), None, None, None, None];
        let mut total = gep;
        if let Some(m) = out.mvc_output {
            let gepc = masked_sq_sum(m, target, keep);
            terms[1] = Some(gepc.clone().detach());
            total = total + gepc;
        }
        let mut total = total.mul_scalar(ctx.per_unit);
        if let Some(ecs) = out.loss_ecs {
            terms[2] = Some(ecs.clone().detach());
            total = total + ecs.mul_scalar(self.terms[2].weight * ctx.per_batch);
        }
        if let Some(local) = out.loss_cce {
            // Across ranks the contrast runs over the global batch, as the original's
            // all-gather does; × world so the averaged gradient is the one-process gradient.
            let world = ctx.comm.world();
            let (cce, factor) = match out.cce_views {
                Some((c1, c2)) if world > 1 => (gathered_cce(ctx.comm, c1, c2)?, world as f64),
                _ => (local, 1.0),
            };
            terms[3] = Some(cce.clone().detach());
            total = total + cce.mul_scalar(self.terms[3].weight * ctx.per_batch * factor);
        }
        if let Some(logits) = out.cls_output {
            let ce = cross_entropy(logits, &b.labels, d);
            terms[4] = Some(ce.clone().detach());
            total = total + ce.mul_scalar(self.terms[4].weight * ctx.per_batch);
        }
        Ok(Loss { total, terms })
    }

    fn eval_width(&self) -> usize {
        4
    }

    fn eval_batch(&self, model: &TransformerModel, batch: &Batch, _index: u64, opt: &CollateOptions, d: &Device, sums: &mut [f64]) -> anyhow::Result<()> {
        let mut b = collate_mlm(batch.cells, self.mask_ratio, opt);
        if let (Some((classes, col)), Some(labels)) = (&self.cls, batch.obs.first()) {
            b.labels = classes.ids(labels, &format!("task.label_col = {col:?}"))?;
        }
        let (n, l) = (b.batch, b.len);
        let out = model.forward(Self::input(&b, &batch.batch_ids.map(<[i64]>::to_vec), d), ForwardFlags { cls: !b.labels.is_empty(), ..Default::default() })?;
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
