//! `scgpt-train` configuration: one TOML per experiment (torchtitan style), sections for the
//! run, the data, the model (under the original's `args.json` names), the optimisation, the
//! validation and the task. Layered by `scgpt-config`: embedded defaults < `--config` <
//! `SCGPT__SECTION__KEY` < `--set section.key=value`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The embedded default: the tiny run on the bundled data (`configs/pretrain_tiny.toml`).
pub const DEFAULTS_TOML: &str = include_str!("../../../configs/pretrain_tiny.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub run: RunSection,
    pub data: DataSection,
    pub model: ModelSection,
    pub train: TrainSection,
    pub valid: ValidSection,
    pub task: TaskSection,
    #[serde(default)]
    pub dist: DistSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Run directory: checkpoints, logs, the resolved config. Rerunning the same command
    /// resumes from the newest complete checkpoint in it.
    pub dir: PathBuf,
    /// Fixes initialisation, data order, gen ratios, permutations, binning ties and dropout.
    pub seed: u64,
    /// Binning ties take the lowest tied bin (no randomness in the data path besides the
    /// seeded order and masks).
    pub deterministic: bool,
    /// Worker threads for the model and the collator; 0 = all cores.
    pub threads: usize,
    /// `cpu` (burn Flex); GPU builds add `cuda` / `wgpu`.
    pub device: String,
    /// Start from scratch even if the run directory holds checkpoints (they are kept).
    pub no_resume: bool,
    /// Stop with a checkpoint once this many steps are done (0 = off), for jobs with a wall
    /// time shorter than the run: the same command resumes.
    pub stop_at_step: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// scgpt-prep output directories.
    pub shards: Vec<PathBuf>,
    /// Sampling weight per set (empty = all 1): a set of weight w contributes w times its row
    /// groups per epoch.
    pub weights: Vec<f64>,
    /// Fraction of cells held out (chosen per cell by a seeded hash, so stable across runs).
    pub valid_fraction: f64,
    /// Row groups whose cells are shuffled together (block shuffling).
    pub shuffle_window: usize,
    /// Batches decoded ahead on the loader thread.
    pub prefetch: usize,
}

/// The model under the original's `args.json` names, so a run's `args.json` is this section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct ModelSection {
    pub embsize: usize,
    pub nheads: usize,
    pub d_hid: usize,
    pub nlayers: usize,
    pub n_layers_cls: usize,
    pub dropout: f64,
    pub n_bins: usize,
    /// Tokens per cell including `<cls>`; longer cells are randomly subsampled.
    pub max_seq_len: usize,
    /// `continuous` (the checkpoints) or `category`.
    pub input_emb_style: String,
    pub pad_value: f64,
    pub mask_value: f64,
    /// GEPC / MVC head (on for the original's pretraining).
    pub MVC: bool,
    pub explicit_zero_prob: bool,
    pub ecs_thres: f64,
    /// All layers start with the same values, as the original's `nn.TransformerEncoder`.
    pub identical_layer_init: bool,
    /// Continual pretraining: an original checkpoint folder (`best_model.pt` + `args.json` +
    /// `vocab.json`) or a native checkpoint (`model.safetensors` + `config.json` +
    /// `vocab.json`). Its architecture wins over this section (only `dropout` is taken from
    /// here); genes of the data missing from its vocabulary are appended as new rows.
    pub init_from: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// `generative` (the original's two-step pretraining, spec §2) or `mlm` (masked values,
    /// spec §2.5).
    pub objective: String,
    /// Cells per micro-batch per rank.
    pub batch_size: usize,
    pub lr: f64,
    /// `adam` (the original) or `adamw`.
    pub optimizer: String,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// `cosine` (transformers' `get_cosine_schedule_with_warmup`) or `constant` (after warmup).
    pub schedule: String,
    pub epochs: u64,
    /// Stop after this many optimizer steps (0 = run the epochs); also the schedule's length
    /// when smaller than the epochs' steps.
    pub max_steps: u64,
    pub grad_accum: usize,
    /// Global L2 norm clip over all gradients (0 = off).
    pub clip_norm: f64,
    pub save_every: u64,
    pub eval_every: u64,
    pub log_every: u64,
    /// Periodic checkpoints kept (the best by validation is kept besides).
    pub keep_last: usize,
    /// `fp32` or `bf16` (pure bf16 where the backend supports it).
    pub precision: String,
    /// Generative: the per-batch share of genes to generate is drawn from these.
    pub gen_ratios: Vec<f64>,
    /// Generative: the cell-prompted second pass (`loss_gen`).
    pub cell_prompt_pass: bool,
    /// MLM: share of non-pad, non-cls positions masked.
    pub mask_ratio: f64,
    /// MLM extras: contrastive cell embedding (weight 10 in the original) and elastic cell
    /// similarity (weight 10).
    pub cce: bool,
    pub ecs: bool,
    pub ecs_weight: f64,
    pub cce_weight: f64,
    /// MLM extra: cell-type classification from the cell embedding (`ClsDecoder`, cross
    /// entropy, the original's `CLS`), on the labels of obs column `cls_col` of every set.
    pub cls: bool,
    pub cls_col: String,
    pub cls_weight: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidSection {
    pub batch_size: usize,
    /// Validation cells used per evaluation (0 = all of the split).
    pub max_cells: usize,
    /// A labelled scgpt-prep set for the embedding metrics (kNN accuracy, ASW); empty = off.
    pub label_set: String,
    /// obs column of `label_set` holding the labels.
    pub label_col: String,
    pub label_max_cells: usize,
    pub knn_k: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// `pretrain`; fine-tuning tasks add theirs.
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistSection {
    /// `auto` (single process unless the launcher set WORLD_SIZE > 1), `single`, `tcp`, `nccl`.
    pub backend: String,
    /// A rank that does not answer within this many seconds ends the job with an error.
    pub timeout_s: u64,
}

impl Default for DistSection {
    fn default() -> Self {
        DistSection { backend: "auto".into(), timeout_s: 300 }
    }
}

impl TrainConfig {
    /// Checks what serde cannot: enumerations, ranges, consistency. Errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        let t = &self.train;
        let m = &self.model;
        ensure!(
            ["generative", "mlm"].contains(&t.objective.as_str()),
            "train.objective = {:?}: expected \"generative\" or \"mlm\"",
            t.objective
        );
        ensure!(["adam", "adamw"].contains(&t.optimizer.as_str()), "train.optimizer = {:?}: expected \"adam\" or \"adamw\"", t.optimizer);
        ensure!(["cosine", "constant"].contains(&t.schedule.as_str()), "train.schedule = {:?}: expected \"cosine\" or \"constant\"", t.schedule);
        ensure!(["fp32", "bf16"].contains(&t.precision.as_str()), "train.precision = {:?}: expected \"fp32\" or \"bf16\"", t.precision);
        ensure!(t.batch_size > 0, "train.batch_size must be at least 1");
        ensure!(t.grad_accum > 0, "train.grad_accum must be at least 1");
        ensure!(t.lr > 0.0 && t.lr.is_finite(), "train.lr must be positive");
        ensure!(t.epochs > 0 || t.max_steps > 0, "train.epochs and train.max_steps are both 0: nothing to run");
        ensure!(t.save_every > 0 && t.eval_every > 0 && t.log_every > 0, "train.save_every, eval_every and log_every must be at least 1");
        ensure!(t.keep_last > 0, "train.keep_last must be at least 1 (resuming needs a checkpoint)");
        ensure!(
            !t.gen_ratios.is_empty() && t.gen_ratios.iter().all(|r| *r > 0.0 && *r < 1.0),
            "train.gen_ratios = {:?}: needs values strictly between 0 and 1",
            t.gen_ratios
        );
        ensure!(t.mask_ratio > 0.0 && t.mask_ratio < 1.0, "train.mask_ratio = {} must be in (0, 1)", t.mask_ratio);
        ensure!(!t.cls || t.objective == "mlm", "train.cls = true needs train.objective = \"mlm\" (the generative objective has no CLS term)");
        ensure!(!t.cls || !t.cls_col.is_empty(), "train.cls = true needs train.cls_col, the obs column with the labels (scgpt-prep --obs-cols)");
        ensure!((0.0..1.0).contains(&t.betas[0]) && (0.0..1.0).contains(&t.betas[1]), "train.betas must be in [0, 1)");
        ensure!(m.max_seq_len >= 3, "model.max_seq_len = {} is too short (cls + at least 2 genes)", m.max_seq_len);
        ensure!(m.n_bins >= 3, "model.n_bins must be at least 3");
        ensure!(
            ["continuous", "category"].contains(&m.input_emb_style.as_str()),
            "model.input_emb_style = {:?}: expected \"continuous\" or \"category\" (scaling is not used for pretraining)",
            m.input_emb_style
        );
        ensure!(!self.data.shards.is_empty(), "data.shards is empty: give at least one scgpt-prep output directory");
        ensure!(
            self.data.weights.is_empty() || self.data.weights.len() == self.data.shards.len(),
            "data.weights has {} entries for {} data.shards",
            self.data.weights.len(),
            self.data.shards.len()
        );
        ensure!((0.0..1.0).contains(&self.data.valid_fraction), "data.valid_fraction must be in [0, 1)");
        ensure!(self.task.kind == "pretrain", "task.kind = {:?}: this build knows \"pretrain\"", self.task.kind);
        ensure!(
            crate::device::available().contains(&self.run.device.as_str()),
            "run.device = {:?}: this build has {}; GPU builds need the cuda, wgpu or vulkan feature",
            self.run.device,
            crate::device::available().join(", ")
        );
        ensure!(self.valid.knn_k > 0, "valid.knn_k must be at least 1");
        Ok(())
    }

    /// The model section as an original `args.json` object (plus the run's training fields,
    /// as the original's pretraining script writes them).
    pub fn args_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = match serde_json::to_value(&self.model).expect("serialises") {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        map.remove("init_from");
        map.remove("identical_layer_init");
        let t = &self.train;
        let extra = serde_json::json!({
            "pad_token": "<pad>",
            "n_cls": 1,
            "USE_GENERATIVE_TRAINING": t.objective == "generative",
            "training_tasks": if t.objective == "generative" { "both" } else { "pcpt" },
            "lr": t.lr,
            "batch_size": t.batch_size,
            "epochs": t.epochs,
            "warmup_ratio_or_step": t.warmup_steps as f64,
            "grad_accu_steps": t.grad_accum,
            "mask_ratio": if t.objective == "generative" { serde_json::json!(t.gen_ratios) } else { serde_json::json!(t.mask_ratio) },
            "USE_CCE": t.cce,
            "ECS": t.ecs,
            "CLS": t.cls,
            "load_model": if self.model.init_from.is_empty() { serde_json::Value::Null } else { self.model.init_from.clone().into() },
            "fp16": false,
            "input_style": "binned",
        });
        if let serde_json::Value::Object(e) = extra {
            map.extend(e);
        }
        map
    }
}

/// Defaults < `config` file < `SCGPT__*` environment < `--set` overrides, then validated.
pub fn resolve(config: Option<&std::path::Path>, sets: &[String]) -> anyhow::Result<TrainConfig> {
    use scgpt_config::{Layered, Origin};
    let mut layered = Layered::new().with_toml_str(DEFAULTS_TOML, Origin::Defaults)?;
    if let Some(p) = config {
        layered = layered.with_file(p)?;
    }
    let layered = layered.with_env("SCGPT", std::env::vars())?.with_sets(sets)?;
    let cfg: TrainConfig = layered.build()?;
    cfg.validate()?;
    Ok(cfg)
}
