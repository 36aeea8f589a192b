//! Run checkpoints (`checkpoints/step-N/{model/, optimizer.bin, state.json}`, written under a
//! temp name and renamed, the oldest beyond `keep_last` removed) and the best model by the
//! task's validation criterion: `best/` (native) and `best_model/` (the original's format plus
//! what `scgpt predict` / `scgpt embed` need to treat new data as training did).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::trainer::Trainer;

/// Saved with every checkpoint: where the run is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done (skipped non-finite steps included).
    pub step: u64,
    /// The data position after the last consumed batch.
    pub position: scgpt_data::loader::DataPosition,
    /// The best validation criterion so far (lower is better: MSE, cross entropy).
    #[serde(alias = "best_valid_mse")]
    pub best_criterion: Option<f64>,
    pub best_step: Option<u64>,
    pub skipped_steps: u64,
    pub cells_seen: u64,
    /// Epoch-end validations in a row without a better criterion (early stopping).
    #[serde(default)]
    pub epochs_without_improvement: u64,
    /// The last epoch whose end was validated (so a resumed run does not validate it twice).
    #[serde(default)]
    pub last_epoch_validated: Option<u64>,
}

/// What `best_model/` records besides the weights, for inference on new data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InferenceSpec {
    /// The task the model was trained for (`pretrain`, `annotation`).
    pub task: String,
    /// obs column the labels came from.
    pub label_col: Option<String>,
    /// var column with gene names in the training h5ad (empty = the var index).
    pub gene_col: String,
    /// obs column of the batch labels the model reads (`batch_labels.json` maps them to ids).
    #[serde(default)]
    pub batch_col: Option<String>,
    /// Tokens per cell, `<cls>` included.
    pub max_seq_len: usize,
    /// The value `<cls>` carried in training (0 in fine-tuning, −2 in pretraining).
    pub cls_value: f32,
    pub pad_value: f32,
    /// Cells were tokenised from their nonzero genes (`include_zero_gene=False`).
    pub include_zero_gene: bool,
    /// The genes inference restricts new data to (names in the vocabulary): with
    /// `include_zero_gene` every cell's tokens (zeros included), else the `[preprocess]`
    /// selection (a cell's nonzero genes among them). `None` = every gene of the vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genes: Option<Vec<String>>,
    /// The `[preprocess]` gene selection of the training input, when it made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<crate::preprocess::GeneSelection>,
    pub n_bins: usize,
    /// The validation criterion and the step it was reached at.
    pub best_criterion: Option<f64>,
    pub best_step: Option<u64>,
}

pub const INFERENCE_FILE: &str = "scgpt.json";

fn ckpt_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The newest complete checkpoint of a run directory (`checkpoints/step-N` with a state).
pub fn latest_checkpoint(run: &Path) -> Option<(u64, PathBuf)> {
    let rd = std::fs::read_dir(ckpt_dir(run)).ok()?;
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").is_file().then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// Writes `dir` through a sibling temp directory and a rename, so a crash leaves the old
/// directory or the new one, never half of one.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let parent = dir.parent().context("a directory without a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = dir.file_name().context("a directory without a name")?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    let old = parent.join(format!(".old-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("{}: cannot move aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot rename into place", dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if let Ok(f) = std::fs::File::open(parent) {
        let _ = f.sync_all();
    }
    Ok(())
}

impl<M: crate::model::EngineModel> Trainer<M> {
    pub(crate) fn inference_spec(&self) -> InferenceSpec {
        let c: &TrainConfig = &self.cfg;
        InferenceSpec {
            task: self.task.kind().to_string(),
            label_col: c.label_col().map(str::to_string),
            gene_col: c.data.gene_col.clone(),
            batch_col: self.batch_map.is_some().then(|| c.data.batch_col.clone()),
            max_seq_len: c.model.max_seq_len,
            cls_value: self.cls_value(),
            pad_value: c.model.pad_value as f32,
            include_zero_gene: self.task.include_zero_gene(),
            genes: self.spec_genes.clone(),
            preprocess: self.selection.clone(),
            n_bins: c.model.n_bins,
            best_criterion: self.state.best_criterion,
            best_step: self.state.best_step,
        }
    }

    /// `best/` (native) and `best_model/` (the original's files + the task's files +
    /// `scgpt.json`), each replaced as a whole.
    pub(crate) fn save_best(&self) -> anyhow::Result<()> {
        let dir = &self.cfg.run.dir;
        let model = self.model();
        write_dir_atomically(&dir.join("best"), |tmp| model.save_native(&self.vocab_json, tmp))?;
        let files = crate::trainer::run_files(self.task.as_ref(), self.batch_map.as_ref())?;
        let spec = serde_json::to_string_pretty(&self.inference_spec())?;
        write_dir_atomically(&dir.join("best_model"), |tmp| {
            model.export_original(&self.vocab_json, tmp)?;
            for (name, bytes) in &files {
                std::fs::write(tmp.join(name), bytes)?;
            }
            std::fs::write(tmp.join(INFERENCE_FILE), spec.as_bytes())?;
            Ok(())
        })
    }

    /// A step checkpoint. Rank 0 only; others wait at a barrier so nobody runs ahead of a
    /// checkpoint it might have to resume from.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<()> {
        if self.lead() {
            let root = ckpt_dir(&self.cfg.run.dir);
            let final_dir = root.join(step_name(self.state.step));
            let state = serde_json::to_string_pretty(&self.state)?;
            write_dir_atomically(&final_dir, |tmp| {
                self.model().save_native(&self.vocab_json, &tmp.join("model"))?;
                self.adam.save(&tmp.join("optimizer.bin"))?;
                scgpt_data::atomic::write_bytes(&tmp.join("state.json"), state.as_bytes())?;
                Ok(())
            })?;
            let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_prefix("step-").and_then(|s| s.parse().ok()).map(|s| (s, e.path()))
                })
                .collect();
            steps.sort();
            let keep = self.cfg.train.keep_last;
            if steps.len() > keep {
                for (_, p) in &steps[..steps.len() - keep] {
                    std::fs::remove_dir_all(p).with_context(|| format!("{}: cannot remove an old checkpoint", p.display()))?;
                }
            }
            self.log.flush()?;
        }
        self.comm.barrier()?;
        Ok(())
    }
}
