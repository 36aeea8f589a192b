//! Validation: the task's own scores over the held-out cells (fixed draws, so every
//! evaluation scores the same masks and splits), the pretraining embedding metrics (kNN
//! accuracy and ASW of `<cls>` embeddings on a labelled set), and the best-model and
//! early-stopping bookkeeping.

use std::path::Path;

use anyhow::bail;
use indicatif::ProgressBar;
use scgpt_data::loader::{Loader, ShardSet};
use scgpt_data::vocab::GeneVocab;
use scgpt_model::burn::tensor::Device;
use scgpt_model::{ForwardFlags, ModelInput, TransformerModel};

use crate::collate::{Cell, CollateOptions};
use crate::config::TrainConfig;
use crate::metrics::{asw_label, knn_accuracy};
use crate::tasks::tensors::{bools, floats, ints};
use crate::tasks::Batch;
use crate::trainer::{map_cell, to_cells, Trainer};

/// A labelled scgpt-prep set whose embeddings are scored during pretraining.
pub struct LabelledSet {
    pub cells: Vec<Cell>,
    pub labels: Vec<usize>,
    pub names: Vec<String>,
}

impl<M: crate::model::EngineModel> Trainer<M> {
    /// One validation pass. `epoch_end`: this is the validation at an epoch's end, which
    /// counts for early stopping. Returns true when the run should stop early.
    pub(crate) fn evaluate(&mut self, bar: &ProgressBar, epoch_end: bool) -> anyhow::Result<bool> {
        let model = crate::precision::compute(&self.model().valid(), self.cfg.train.precision);
        let dev = self.device.clone().inner();
        let v = self.cfg.valid.clone();
        let mut sums = vec![0f64; self.task.eval_width()];
        let loader = Loader::new(self.valid_sets.clone(), self.loader_config(v.batch_size, true))?;
        let mut opt: CollateOptions = self.collate;
        // Fixed draws: every evaluation scores the same masks and splits.
        opt.epoch = u64::MAX;
        opt.draw_seed = self.cfg.run.seed ^ 0x5A11D;
        let mut seen = 0usize;
        for (bi, batch) in loader.valid().enumerate() {
            let batch = batch?;
            if v.max_cells > 0 && seen >= v.max_cells {
                break;
            }
            seen += batch.cells.len();
            let cells = to_cells(&batch, &self.valid_maps);
            let (obs, ids) = self.split_obs(&batch.cells.obs)?;
            let b = Batch { cells: &cells, obs, batch_ids: ids.as_deref(), genes: &self.genes };
            self.task.eval_batch(&model, &b, bi as u64, &opt, &dev, &mut sums)?;
        }
        self.comm.all_reduce_sum_f64(&mut sums)?;
        let eval = self.task.eval_finish(&sums);
        let step = self.state.step;
        let mut scalars = eval.scalars.clone();
        if self.lead() {
            if let (Some(set), Some(transformer)) = (&self.labelled, model.as_transformer()) {
                let emb = embed_cells(transformer, &set.cells, &self.collate, v.batch_size, &dev)?;
                scalars.push(("valid/knn_accuracy".into(), knn_accuracy(&emb, &set.labels, v.knn_k)));
                scalars.push(("valid/asw_label".into(), asw_label(&emb, &set.labels)));
            }
            let line = scalars.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join(", ");
            let at = if epoch_end { format!("epoch {} end", self.state.position.epoch) } else { format!("step {step}") };
            if bar.is_hidden() {
                eprintln!("{at}: {line}");
            } else {
                bar.println(format!("{at}: {line}"));
            }
            self.log.write(step, &scalars)?;
        }
        let mut improved = false;
        if let Some(c) = eval.criterion {
            if self.state.best_criterion.is_none_or(|b| c < b) {
                improved = true;
                self.state.best_criterion = Some(c);
                self.state.best_step = Some(step);
                if self.lead() {
                    self.save_best()?;
                }
            }
        }
        if epoch_end {
            self.state.last_epoch_validated = Some(self.state.position.epoch);
            self.state.epochs_without_improvement = if improved { 0 } else { self.state.epochs_without_improvement + 1 };
            let patience = self.cfg.train.early_stop_patience;
            return Ok(patience > 0 && self.state.epochs_without_improvement >= patience);
        }
        Ok(false)
    }
}

/// Unit-norm `<cls>` embeddings of cells, tokenised as `scgpt embed --deterministic` (lowest
/// tied bin, the most expressed genes of long cells).
pub fn embed_cells(
    model: &TransformerModel,
    cells: &[Cell],
    opt: &CollateOptions,
    batch: usize,
    dev: &Device,
) -> anyhow::Result<Vec<Vec<f32>>> {
    use scgpt_data::tokenize::{collate, tokenize, Scratch, TokenizeOptions};
    let topt = TokenizeOptions { max_seq_len: opt.max_seq_len, cls_id: opt.cls_id, pad_value: opt.pad_value, seed: None };
    let mut scratch = Scratch::default();
    let mut out = Vec::with_capacity(cells.len());
    for chunk in cells.chunks(batch.max(1)) {
        let tokens: Vec<_> = chunk.iter().map(|c| tokenize(c.key, &c.genes, &c.values, &topt, &mut scratch)).collect();
        let b = collate(&tokens.iter().collect::<Vec<_>>(), opt.pad_id, opt.pad_value);
        let o = model.forward(
            ModelInput {
                src: ints(&b.ids, b.b, b.l, dev),
                values: floats(&b.values, b.b, b.l, dev),
                src_key_padding_mask: bools(&b.pad, b.b, b.l, dev),
                batch_labels: None,
            },
            ForwardFlags::default(),
        )?;
        let emb: Vec<f32> = o.cell_emb.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
        let d = emb.len() / b.b;
        for row in emb.chunks(d) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            out.push(row.iter().map(|x| x / norm).collect());
        }
    }
    Ok(out)
}

pub fn load_labelled(cfg: &TrainConfig, vocab: &GeneVocab) -> anyhow::Result<LabelledSet> {
    let dir = Path::new(&cfg.valid.label_set);
    let set = ShardSet::open(dir, 1.0).map_err(|e| e.context(format!("valid.label_set = {}", dir.display())))?;
    let map = set.vocab.id_map(vocab);
    let mut cells = Vec::new();
    let mut raw_labels = Vec::new();
    'outer: for (path, _) in &set.shards {
        let (names, cols) = scgpt_data::shard::read_shard(path)?;
        let Some(k) = names.iter().position(|n| *n == cfg.valid.label_col) else {
            bail!("valid.label_col = {:?}: not an obs column of {} (it has: {})", cfg.valid.label_col, path.display(), names.join(", "));
        };
        for i in 0..cols.len() {
            if cells.len() >= cfg.valid.label_max_cells {
                break 'outer;
            }
            let (genes, values, _) = cols.cell(i);
            cells.push(map_cell(genes, values, &map, i as u64));
            raw_labels.push(cols.obs[k][i].clone());
        }
    }
    let mut names: Vec<String> = raw_labels.clone();
    names.sort();
    names.dedup();
    let labels = raw_labels.iter().map(|l| names.binary_search(l).expect("present")).collect();
    if names.len() < 2 {
        bail!(
            "valid.label_col = {:?} of {} has {} distinct label(s); kNN/ASW need at least 2",
            cfg.valid.label_col,
            dir.display(),
            names.len()
        );
    }
    Ok(LabelledSet { cells, labels, names })
}
