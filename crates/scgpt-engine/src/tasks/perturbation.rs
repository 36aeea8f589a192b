//! Perturbation prediction (the original's Tutorial_Perturbation) on the `TransformerGenerator`:
//! each cell of a training condition is the target `y`; its input is a control cell `x` with
//! the perturbation flag (1) on the condition's genes; the loss is the MSE of the predicted
//! expression against `y` over every token. Control cells are their own input, as in GEARS.
//!
//! - Tokens: every screen gene (`include_zero_gene = "all"`), genes outside the model's
//!   vocabulary as `<pad>` (unmasked, as the original). When the screen has more genes than
//!   `model.max_seq_len`, each micro-batch takes one seeded random subset of that many, which
//!   **always keeps the batch's perturbed genes** (the original's `randperm` drops them with
//!   p ≈ 0.7 at 1,536 of 5,060 genes, so most rows train without their flag).
//! - Pairing: a perturbed cell's control is drawn uniformly per (seed, epoch, cell): a fresh
//!   control each epoch, where GEARS fixes one pairing once. Validation draws are fixed.
//! - Validation: every gene, per val condition the mean prediction against the mean of its
//!   cells; `pearson` (the original's best-model criterion: the highest) and `pearson_delta`
//!   (both against the mean of all control cells), as `compute_perturbation_metrics`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use scgpt_data::loader::ShardSet;
use scgpt_data::seed::{hash_str, mix64, rng_for};
use scgpt_data::vocab::GeneVocab;
use scgpt_eval::perturbation::{ConditionFormat, PerturbationSplit};
use scgpt_model::burn::tensor::Device;
use scgpt_model::{ForwardFlags, PerturbationInput, TransformerGenerator};

use super::tensors::{bools, floats, ints};
use super::{full_attention_flops, Batch, Evaluation, Loss, LossContext, MicroBatch, ModelShape, Norm, Task, Term};
use crate::collate::{Cell, CollateOptions};
use crate::config::{TaskKind, TrainConfig};
use crate::perturbation_data::{ScreenSpec, SCREEN_FILE, SPLIT_FILE};

/// The flag the original's GEARS data put on perturbed genes (0 = not perturbed = padding id).
pub const PERTURBED_FLAG: i64 = 1;

pub struct Perturbation {
    terms: Vec<Term>,
    spec: ScreenSpec,
    split: PerturbationSplit,
    /// Shard-vocabulary id → screen column.
    column_of: Vec<Option<u32>>,
    /// Screen column → model token id (`<pad>` for genes outside the vocabulary).
    tokens: Vec<i64>,
    /// Control cells, dense over the screen's genes.
    control: Vec<Vec<f32>>,
    control_mean: Vec<f64>,
    /// Condition → its perturbed screen columns (the control: none).
    perturbed: HashMap<String, Vec<usize>>,
    /// Val conditions in the order of the validation sums.
    val: Vec<String>,
    max_seq_len: usize,
}

/// The task the perturbation trainer builds (`Trainer::<TransformerGenerator>::with_tasks`).
pub fn build(cfg: &TrainConfig, sets: &[ShardSet], run_dir: &Path, _resuming: bool) -> anyhow::Result<Box<dyn Task<TransformerGenerator>>> {
    anyhow::ensure!(
        cfg.task.kind == TaskKind::Perturbation,
        "task.kind = {:?}: the perturbation trainer runs task.kind = \"perturbation\"",
        cfg.task.kind.as_str()
    );
    Ok(Box::new(Perturbation::new(cfg, sets, run_dir)?))
}

impl Perturbation {
    pub fn new(cfg: &TrainConfig, sets: &[ShardSet], run_dir: &Path) -> anyhow::Result<Self> {
        let spec = ScreenSpec::load(&run_dir.join("data").join(SCREEN_FILE))?;
        let split = PerturbationSplit::load(&run_dir.join(SPLIT_FILE))?;
        let vocab = &sets[0].vocab;
        let column: HashMap<&str, u32> = spec.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i as u32)).collect();
        let column_of: Vec<Option<u32>> = vocab.tokens().iter().map(|t| column.get(t.as_str()).copied()).collect();
        for s in &sets[1..] {
            anyhow::ensure!(
                s.vocab.tokens().starts_with(vocab.tokens()) || vocab.tokens().starts_with(s.vocab.tokens()),
                "{}: its vocabulary differs from the training cells'; delete {} and rerun",
                s.dir.display(),
                run_dir.join("data").display()
            );
        }
        let control_label = &spec.options.control;
        let mut control = Vec::new();
        for (path, _) in &sets[0].shards {
            let (names, cols) = scgpt_data::shard::read_shard(path)?;
            let k = names
                .iter()
                .position(|n| *n == spec.options.condition_col)
                .with_context(|| format!("{}: no obs column {:?}", path.display(), spec.options.condition_col))?;
            for i in 0..cols.offsets.len() - 1 {
                if cols.obs[k][i] == *control_label {
                    let (genes, values, _) = cols.cell(i);
                    let mut row = vec![0f32; spec.genes.len()];
                    for (&g, &v) in genes.iter().zip(values) {
                        if let Some(Some(c)) = column_of.get(g as usize) {
                            row[*c as usize] = v;
                        }
                    }
                    control.push(row);
                }
            }
        }
        if control.is_empty() {
            bail!(
                "{}: no control cells ({} = {control_label:?}) among the training cells",
                sets[0].dir.display(),
                spec.options.condition_col
            );
        }
        let mut control_mean = vec![0f64; spec.genes.len()];
        for row in &control {
            for (m, &v) in control_mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        control_mean.iter_mut().for_each(|m| *m /= control.len() as f64);
        let mut perturbed = HashMap::new();
        perturbed.insert(control_label.clone(), Vec::new());
        let format = ConditionFormat { control: control_label.clone(), separator: spec.options.separator.clone() };
        let skipped: std::collections::HashSet<&str> = spec.skipped.iter().map(|(c, _)| c.as_str()).collect();
        for name in split.train.iter().chain(&split.val).chain(&split.test).filter(|c| !skipped.contains(c.as_str())) {
            let cond = format.parse(name)?;
            let cols = cond
                .genes()
                .into_iter()
                .map(|g| {
                    column
                        .get(g)
                        .map(|&c| c as usize)
                        .with_context(|| format!("condition {name}: gene {g} is not among the screen's genes"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            perturbed.insert(name.clone(), cols);
        }
        let val = crate::perturbation_data::without(&split.val, &spec.skipped);
        Ok(Perturbation {
            terms: vec![Term { name: "mse", weight: 1.0, norm: Norm::Units }],
            spec,
            split,
            column_of,
            tokens: Vec::new(),
            control,
            control_mean,
            perturbed,
            val,
            max_seq_len: cfg.model.max_seq_len,
        })
    }

    fn genes(&self) -> usize {
        self.spec.genes.len()
    }

    /// A cell's expression, dense over the screen's genes.
    fn dense(&self, cell: &Cell) -> Vec<f32> {
        let mut row = vec![0f32; self.genes()];
        for (&g, &v) in cell.genes.iter().zip(&cell.values) {
            if let Some(Some(c)) = self.column_of.get(g as usize) {
                row[*c as usize] = v;
            }
        }
        row
    }

    fn perturbed_of(&self, condition: &str) -> anyhow::Result<&[usize]> {
        self.perturbed.get(condition).map(Vec::as_slice).with_context(|| {
            format!("a cell of condition {condition:?}, which the split does not list; delete the run's data/ and split.json and rerun")
        })
    }

    /// The tensors of cells paired with controls, over `columns` (all genes when `None`).
    fn collate(&self, batch: &Batch, columns: Option<&[usize]>, opt: &CollateOptions) -> anyhow::Result<PerturbBatch> {
        anyhow::ensure!(!self.tokens.is_empty(), "the perturbation task was not bound to the model vocabulary");
        let all: Vec<usize>;
        let cols = match columns {
            Some(c) => c,
            None => {
                all = (0..self.genes()).collect();
                &all
            }
        };
        let (b, l) = (batch.cells.len(), cols.len());
        let mut p = PerturbBatch {
            b,
            l,
            ids: Vec::with_capacity(b * l),
            values: Vec::with_capacity(b * l),
            target: Vec::with_capacity(b * l),
            flags: Vec::with_capacity(b * l),
            conditions: Vec::with_capacity(b),
        };
        let mut flag = vec![0i64; self.genes()];
        for (cell, condition) in batch.cells.iter().zip(&batch.obs[0]) {
            let y = self.dense(cell);
            let perturbed = self.perturbed_of(condition)?;
            let x = if perturbed.is_empty() {
                y.clone()
            } else {
                let draw = mix64(opt.draw_seed ^ mix64(opt.epoch) ^ mix64(cell.key) ^ hash_str("control pairing"));
                self.control[(draw % self.control.len() as u64) as usize].clone()
            };
            perturbed.iter().for_each(|&c| flag[c] = PERTURBED_FLAG);
            for &c in cols {
                p.ids.push(self.tokens[c]);
                p.values.push(x[c]);
                p.target.push(y[c]);
                p.flags.push(flag[c]);
            }
            perturbed.iter().for_each(|&c| flag[c] = 0);
            p.conditions.push(condition.clone());
        }
        Ok(p)
    }

    /// The micro-batch's genes: all when they fit `max_seq_len`, else [`sample_genes`].
    fn sample_columns(&self, batch: &Batch, step: u64, opt: &CollateOptions) -> anyhow::Result<Option<Vec<usize>>> {
        if self.genes() <= self.max_seq_len {
            return Ok(None);
        }
        let mut forced = Vec::new();
        for condition in &batch.obs[0] {
            forced.extend_from_slice(self.perturbed_of(condition)?);
        }
        let first = batch.cells.first().map_or(0, |c| c.key);
        let seed = mix64(opt.draw_seed ^ mix64(step)) ^ mix64(opt.epoch) ^ first;
        sample_genes(self.genes(), self.max_seq_len, &forced, seed).map(Some)
    }

    /// The screen's genes in column order (what predictions are over).
    pub fn screen_genes(&self) -> &[String] {
        &self.spec.genes
    }

    pub fn split(&self) -> &PerturbationSplit {
        &self.split
    }
}

/// `len` of `n_genes` columns: every one of `forced` (the batch's perturbed genes, in order of
/// first appearance), then a seeded random rest in random order.
pub fn sample_genes(n_genes: usize, len: usize, forced: &[usize], seed: u64) -> anyhow::Result<Vec<usize>> {
    use rand::seq::SliceRandom;
    let mut chosen = vec![false; n_genes];
    let mut cols = Vec::with_capacity(len.min(n_genes));
    for &c in forced {
        if !chosen[c] {
            chosen[c] = true;
            cols.push(c);
        }
    }
    if cols.len() > len {
        bail!("a batch perturbs {} genes, more than model.max_seq_len = {len}; lower train.batch_size or raise max_seq_len", cols.len());
    }
    let mut order: Vec<usize> = (0..n_genes).collect();
    order.shuffle(&mut rng_for(seed, hash_str("perturbation genes"), 0));
    cols.extend(order.into_iter().filter(|&c| !chosen[c]).take(len.saturating_sub(cols.len())));
    Ok(cols)
}

/// The task's loss on a collated batch: Σ (prediction − target)² over every token (the term's
/// raw value), times `ctx.per_unit` (the step's tokens) for the total; on one batch with
/// `per_unit = 1 / (b·l)` it is the tutorial's `masked_mse_loss` with every position selected.
pub fn mse_loss(model: &TransformerGenerator, b: &PerturbBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
    let d = ctx.device;
    let out = model.forward(b.input(d), ForwardFlags::default())?;
    let sq = (out.mlm_output - floats(&b.target, b.b, b.l, d)).square().sum();
    let total = sq.clone().mul_scalar(ctx.per_unit);
    Ok(Loss { total, terms: vec![Some(sq.detach())] })
}

/// A collated perturbation micro-batch, row-major `[b, l]`.
pub struct PerturbBatch {
    pub b: usize,
    pub l: usize,
    pub ids: Vec<i64>,
    /// The paired control cell's values (the model's input).
    pub values: Vec<f32>,
    /// The perturbed cell's values.
    pub target: Vec<f32>,
    pub flags: Vec<i64>,
    pub conditions: Vec<String>,
}

impl PerturbBatch {
    pub fn input(&self, d: &Device) -> PerturbationInput {
        PerturbationInput {
            src: ints(&self.ids, self.b, self.l, d),
            values: floats(&self.values, self.b, self.l, d),
            input_pert_flags: ints(&self.flags, self.b, self.l, d),
            src_key_padding_mask: bools(&vec![false; self.b * self.l], self.b, self.l, d),
        }
    }
}

impl MicroBatch for PerturbBatch {
    fn units(&self) -> usize {
        self.b * self.l
    }
    fn input_tokens(&self) -> usize {
        self.b * self.l
    }
    fn encoder_flops(&self, shape: ModelShape) -> f64 {
        full_attention_flops(shape, self.b, self.l)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Pearson correlation; `None` when either side is constant.
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

impl Task<TransformerGenerator> for Perturbation {
    fn kind(&self) -> TaskKind {
        TaskKind::Perturbation
    }
    fn terms(&self) -> &[Term] {
        &self.terms
    }
    fn obs_cols(&self) -> Vec<String> {
        vec![self.spec.options.condition_col.clone()]
    }
    fn cells_in_data_ids(&self) -> bool {
        true
    }
    fn bind_vocab(&mut self, vocab: &GeneVocab) -> anyhow::Result<Vec<String>> {
        let pad = vocab.pad_id().context("the model vocabulary has no <pad>")? as i64;
        self.tokens = self.spec.genes.iter().map(|g| vocab.get(g).map_or(pad, |id| id as i64)).collect();
        let outside = self.tokens.iter().filter(|&&t| t == pad).count();
        Ok(vec![format!(
            "tokens: all {} screen genes per cell ({} outside the model vocabulary, fed as <pad>), {} per training batch; {} control cells for pairing",
            self.genes(),
            outside,
            self.genes().min(self.max_seq_len),
            self.control.len()
        )])
    }
    fn run_files(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![
            (SCREEN_FILE.to_string(), serde_json::to_vec_pretty(&self.spec)?),
            (SPLIT_FILE.to_string(), serde_json::to_vec_pretty(&self.split)?),
        ])
    }

    fn prepare(&self, batch: &Batch, step: u64, opt: &CollateOptions) -> anyhow::Result<Box<dyn MicroBatch>> {
        let cols = self.sample_columns(batch, step, opt)?;
        Ok(Box::new(self.collate(batch, cols.as_deref(), opt)?))
    }

    fn loss(&self, model: &TransformerGenerator, batch: &dyn MicroBatch, ctx: &mut LossContext) -> anyhow::Result<Loss> {
        let b = batch.as_any().downcast_ref::<PerturbBatch>().expect("a perturbation batch");
        mse_loss(model, b, ctx)
    }

    /// Per val condition: `[cells, Σ prediction (genes), Σ truth (genes)]`.
    fn eval_width(&self) -> usize {
        self.val.len() * (1 + 2 * self.genes())
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
        let g = self.genes();
        let b = self.collate(batch, None, opt)?;
        let out = model.forward(b.input(d), ForwardFlags::default())?;
        let pred: Vec<f32> = out.mlm_pred.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
        for (i, condition) in b.conditions.iter().enumerate() {
            let Some(k) = self.val.iter().position(|v| v == condition) else { continue };
            let base = k * (1 + 2 * g);
            sums[base] += 1.0;
            for j in 0..g {
                sums[base + 1 + j] += pred[i * g + j] as f64;
                sums[base + 1 + g + j] += b.target[i * g + j] as f64;
            }
        }
        Ok(())
    }

    fn eval_finish(&self, sums: &[f64]) -> Evaluation {
        let g = self.genes();
        let (mut p, mut pd, mut mse) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..self.val.len() {
            let base = k * (1 + 2 * g);
            let n = sums[base];
            if n == 0.0 {
                continue;
            }
            let pred: Vec<f64> = sums[base + 1..base + 1 + g].iter().map(|s| s / n).collect();
            let truth: Vec<f64> = sums[base + 1 + g..base + 1 + 2 * g].iter().map(|s| s / n).collect();
            // compute_perturbation_metrics skips conditions whose true mean is all zero.
            if truth.iter().all(|v| *v == 0.0) {
                continue;
            }
            mse.push(pred.iter().zip(&truth).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / g as f64);
            p.extend(pearson(&pred, &truth));
            let dp: Vec<f64> = pred.iter().zip(&self.control_mean).map(|(a, m)| a - m).collect();
            let dt: Vec<f64> = truth.iter().zip(&self.control_mean).map(|(a, m)| a - m).collect();
            pd.extend(pearson(&dp, &dt));
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let mut scalars = Vec::new();
        for (name, v) in [("valid/pearson", mean(&p)), ("valid/pearson_delta", mean(&pd)), ("valid/mse_of_means", mean(&mse))] {
            if let Some(v) = v {
                scalars.push((name.to_string(), v));
            }
        }
        scalars.push(("valid/conditions".into(), mse.len() as f64));
        // The original keeps the model with the highest validation pearson; the engine keeps
        // the lowest criterion.
        Evaluation { criterion: mean(&p).map(|v| -v), scalars }
    }
}

#[cfg(test)]
mod tests {
    use super::{pearson, sample_genes};

    #[test]
    fn sampling_keeps_every_perturbed_gene_and_fills_with_distinct_others() {
        for seed in 0..200 {
            let cols = sample_genes(5060, 1536, &[4000, 17, 4000, 5059], seed).unwrap();
            assert_eq!(cols.len(), 1536);
            assert_eq!(&cols[..3], &[4000, 17, 5059]);
            let mut sorted = cols.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 1536, "distinct genes");
        }
        assert_ne!(sample_genes(100, 10, &[], 1).unwrap(), sample_genes(100, 10, &[], 2).unwrap(), "the seed draws the rest");
        assert!(sample_genes(100, 2, &[1, 2, 3], 0).is_err());
    }

    #[test]
    fn pearson_is_undefined_for_a_constant_side() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]).unwrap() - 0.997_948_7).abs() < 1e-6, "numpy.corrcoef gives 0.9979487");
        assert!(pearson(&[1.0, 1.0, 1.0], &[2.0, 4.0, 6.0]).is_none());
    }
}
