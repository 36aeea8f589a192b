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
    pub preprocess: PreprocessSection,
    #[serde(default)]
    pub dist: DistSection,
}

/// The original `Preprocessor`'s gene selection on `data.input`, before preparation. Only the
/// steps that change what the model sees are here: which genes a cell has. `normalize_total`
/// and `log1p` are not: binning is rank-based per cell, so neither changes a bin (ties apart),
/// and the HVG selection runs on the matrix as given, as the original runs it on `adata.X`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessSection {
    /// Keep genes with at least this many counts over all cells of the input
    /// (`sc.pp.filter_genes(min_counts=k)`, the original's `filter_gene_by_counts`); 0 = off.
    pub filter_gene_by_counts: f64,
    /// Keep this many highly variable genes (`subset_hvg`); 0 = every gene.
    pub hvg: usize,
    /// `auto` (the original's rule: `seurat_v3` on integer counts, `cell_ranger` otherwise),
    /// `seurat_v3`, `cell_ranger` or `seurat`.
    pub hvg_flavor: String,
    /// HVGs per batch of `data.batch_col` (scanpy's `batch_key`), when that is set.
    pub hvg_per_batch: bool,
}

impl Default for PreprocessSection {
    fn default() -> Self {
        PreprocessSection { filter_gene_by_counts: 0.0, hvg: 0, hvg_flavor: "auto".into(), hvg_per_batch: true }
    }
}

impl PreprocessSection {
    pub fn selects_genes(&self) -> bool {
        self.filter_gene_by_counts > 0.0 || self.hvg > 0
    }
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
    /// Attention of training steps: `explicit` keeps the `[B, H, L, L]` scores for the backward
    /// (the reference path, memory quadratic in the cell length); `blockwise` computes query
    /// blocks and recomputes them in the backward (memory linear in the cell length: the
    /// whole-human recipe on one GPU; on the CPU a fused kernel, 1.5x faster at 1,200 tokens).
    /// Values, gradients and dropout masks are the same up to float rounding.
    #[serde(default)]
    pub attention: AttentionKind,
    /// Query rows per block of `attention = "blockwise"`.
    #[serde(default = "default_attention_block_rows")]
    pub attention_block_rows: usize,
}

fn default_attention_block_rows() -> usize {
    scgpt_model::layers::AttentionMode::DEFAULT_BLOCK_ROWS
}

impl RunSection {
    /// The model's attention mode for training steps.
    pub fn attention_mode(&self) -> scgpt_model::layers::AttentionMode {
        use scgpt_model::layers::AttentionMode;
        match self.attention {
            AttentionKind::Explicit => AttentionMode::Explicit,
            AttentionKind::Blockwise => AttentionMode::Blockwise { block_rows: self.attention_block_rows },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// h5ad file(s) to fine-tune on, prepared into `run.dir/data` with the scgpt-prep code (a
    /// single path or a list). When set it is the data, alone: `shards` and `weights` are
    /// ignored.
    #[serde(default, deserialize_with = "one_or_many")]
    pub input: Vec<PathBuf>,
    /// var column with the gene names of `input` (CELLxGENE: `feature_name`); empty = the
    /// var index.
    #[serde(default)]
    pub gene_col: String,
    /// `input` may hold non-integer values (normalised, log1p, TPM); binning is per-cell rank
    /// based, so they bin like the counts they came from.
    #[serde(default)]
    pub allow_non_integer: bool,
    /// obs column with each cell's batch (sample, donor, technology): mapped to ids
    /// (`batch_labels.json` in the run directory and `best_model/`) and given to the model,
    /// which reads them with `model.use_batch_labels` or `model.domain_spec_batchnorm`.
    #[serde(default)]
    pub batch_col: String,
    /// Each training batch holds cells of one `batch_col` value (the original's
    /// `SubsetsBatchSampler`; DSBN normalises a batch with its first cell's domain): within a
    /// shuffle window the cells of each value are shuffled and cut into batches, and the
    /// batches of all values are shuffled together. Set `shuffle_window` to cover the data
    /// for the original's behaviour.
    #[serde(default)]
    pub single_batch_minibatches: bool,
    /// Perturbation screens: obs column with each cell's condition (GEARS: `condition`).
    #[serde(default = "default_condition_col")]
    pub condition_col: String,
    /// Perturbation screens: the condition label of control cells (GEARS: `ctrl`).
    #[serde(default = "default_control")]
    pub control: String,
    /// Perturbation screens: what joins the genes of a condition (GEARS: `+`).
    #[serde(default = "default_separator")]
    pub separator: String,
    /// Perturbation screens of raw counts: normalise each cell to 1e4 and log1p, as GEARS's
    /// data were (log-normalised input is read as it is, and counts are refused without this).
    #[serde(default)]
    pub normalize: bool,
    /// Perturbation screens: a condition whose perturbed gene is missing from the screen's
    /// genes or the vocabulary is an error (default: skipped with a warning).
    #[serde(default)]
    pub strict: bool,
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
    /// Domain adversarial head on the cell embedding, behind gradient reversal (the original's
    /// `do_dab` / `DAR`; needs `data.batch_col`); weighted by `train.dab_weight`.
    #[serde(default)]
    pub DAR: bool,
    /// Concatenate a batch embedding to the expression decoders' input (needs `data.batch_col`).
    #[serde(default)]
    pub use_batch_labels: bool,
    /// `none`, `dsbn` (one affine-free BatchNorm per batch on the input embeddings; needs
    /// `data.batch_col`) or `batchnorm` (one BatchNorm, the `bn` of the original's 2023
    /// annotation runs; the original demands batch labels for it too).
    #[serde(default = "default_dsbn")]
    pub domain_spec_batchnorm: String,
    /// How the cell embedding (what the CLS head and `embed` read) comes off the transformer:
    /// `cls` (the original's default and its checkpoints), `avg-pool` (mean over positions,
    /// padding included, as the original computes it) or `w-pool`.
    #[serde(default = "default_cell_emb_style")]
    pub cell_emb_style: String,
    /// All layers start with the same values, as the original's `nn.TransformerEncoder`.
    pub identical_layer_init: bool,
    /// With `init_from`: load only parameters whose name starts with one of these (the
    /// original's `load_param_prefixs`, e.g. ["encoder", "value_encoder",
    /// "transformer_encoder"]); empty = every parameter whose name and shape match.
    #[serde(default)]
    pub init_prefixes: Vec<String>,
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
    /// spec §2.5); read by `task.kind = "pretrain"`.
    pub objective: Objective,
    /// Cells per micro-batch per rank.
    pub batch_size: usize,
    pub lr: f64,
    /// `adam` (the original) or `adamw`.
    pub optimizer: OptimizerKind,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// `cosine` (transformers' `get_cosine_schedule_with_warmup`), `constant` (after warmup) or
    /// `step` (the fine-tuning tutorials' per-epoch `StepLR`: lr · gamma^epoch).
    pub schedule: Schedule,
    /// `step` schedule: the factor applied at each epoch's end.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
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
    /// `fp32`; `bf16`: bf16 compute with fp32 master weights, gradients and Adam moments
    /// (`precision.rs`); `bf16-pure`: everything bf16 (does not learn at small learning rates).
    pub precision: Precision,
    /// Validate (and keep `best_model/` by the task's criterion) at each epoch's end too, as
    /// the fine-tuning tutorials do.
    #[serde(default)]
    pub eval_each_epoch: bool,
    /// Stop when this many epoch-end validations in a row bring no improvement (0 = off).
    #[serde(default)]
    pub early_stop_patience: u64,
    /// Parameters whose name starts with one of these are not trained (e.g. ["encoder",
    /// "value_encoder"], the annotation tutorial's `freeze`). Ignored without `model.init_from`.
    #[serde(default)]
    pub freeze: Vec<String>,
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
    /// entropy, the original's `CLS`), on the labels of obs column `task.label_col`.
    pub cls: bool,
    /// Deprecated spelling of `task.label_col` (read into it; both set and different is an
    /// error).
    pub cls_col: String,
    pub cls_weight: f64,
    /// Weight of the DAR cross entropy (`model.DAR`; the integration tutorial's `dab_weight`).
    #[serde(default = "default_dab_weight")]
    pub dab_weight: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidSection {
    /// A separate validation h5ad (prepared like `data.input`); empty = a split of the data.
    #[serde(default)]
    pub input: String,
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
    /// What the run trains: `pretrain` (`train.objective` picks generative or masked values)
    /// or `annotation` (cell-type classification from `<cls>`).
    pub kind: TaskKind,
    /// obs column with the cell labels (annotation; the MLM's CLS term).
    #[serde(default)]
    pub label_col: String,
    /// Annotation: `none` or `balanced` (n_cells / (n_classes · n_cells_of_class), as
    /// scikit-learn's `class_weight="balanced"`).
    #[serde(default)]
    pub class_weight: ClassWeight,
    /// Fine-tuning tokenisation (`tokenize_and_pad_batch`): every gene of the data is a token,
    /// zeros included (the integration tutorial), instead of the nonzero genes alone.
    #[serde(default)]
    pub include_zero_gene: bool,
    /// Perturbation: how conditions are split into train/val/test, `simulation` (GEARS's
    /// unseen-gene split) or `no_test`.
    #[serde(default = "default_split")]
    pub split: String,
    /// Perturbation: the split's seed (GEARS's default 1).
    #[serde(default = "default_split_seed")]
    pub split_seed: u64,
    /// Perturbation: a `split.json` to reuse instead of drawing one.
    #[serde(default)]
    pub split_file: String,
    /// Perturbation, `simulation` split: the fraction of perturbed genes seen in training.
    #[serde(default = "default_three_quarters")]
    pub train_gene_set_size: f64,
    /// Perturbation, `simulation` split: the fraction of the doubles with both genes seen
    /// that go to training.
    #[serde(default = "default_three_quarters")]
    pub combo_seen2_train_frac: f64,
}

fn default_condition_col() -> String {
    "condition".into()
}

fn default_control() -> String {
    "ctrl".into()
}

fn default_separator() -> String {
    "+".into()
}

fn default_split() -> String {
    "simulation".into()
}

fn default_split_seed() -> u64 {
    1
}

fn default_three_quarters() -> f64 {
    0.75
}

/// Option strings parsed once; serde's error lists the accepted values.
macro_rules! options {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }
        impl $name {
            pub fn as_str(&self) -> &'static str { match self { $(Self::$variant => $text),+ } }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

options!(Objective { Generative = "generative", Mlm = "mlm" });
options!(OptimizerKind { Adam = "adam", AdamW = "adamw" });
options!(Schedule { Cosine = "cosine", Constant = "constant", Step = "step" });
options!(Precision { Fp32 = "fp32", Bf16 = "bf16", PureBf16 = "bf16-pure" });
options!(AttentionKind { Explicit = "explicit", Blockwise = "blockwise" });

// `options!` declares the enum and cannot place `#[default]` on a variant.
#[allow(clippy::derivable_impls)]
impl Default for AttentionKind {
    fn default() -> Self {
        AttentionKind::Explicit
    }
}
options!(TaskKind { Pretrain = "pretrain", Annotation = "annotation", Integration = "integration", Perturbation = "perturbation" });
options!(ClassWeight { None = "none", Balanced = "balanced" });

#[allow(clippy::derivable_impls)] // declared by `options!`, as above
impl Default for ClassWeight {
    fn default() -> Self {
        ClassWeight::None
    }
}

fn default_dsbn() -> String {
    "none".into()
}

fn default_cell_emb_style() -> String {
    "cls".into()
}

fn default_dab_weight() -> f64 {
    1.0
}

fn default_gamma() -> f64 {
    0.9
}

/// `"a.h5ad"` or `["a.h5ad", "b.h5ad"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) if p.as_os_str().is_empty() => Vec::new(),
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
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
    /// Checks what serde cannot: ranges and consistency. Errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        let t = &self.train;
        let m = &self.model;
        ensure!(t.batch_size > 0, "train.batch_size must be at least 1");
        ensure!(self.run.attention_block_rows > 0, "run.attention_block_rows must be at least 1");
        ensure!(t.grad_accum > 0, "train.grad_accum must be at least 1");
        ensure!(t.lr > 0.0 && t.lr.is_finite(), "train.lr must be positive");
        ensure!(t.epochs > 0 || t.max_steps > 0, "train.epochs and train.max_steps are both 0: nothing to run");
        ensure!(t.save_every > 0 && t.eval_every > 0 && t.log_every > 0, "train.save_every, eval_every and log_every must be at least 1");
        ensure!(t.keep_last > 0, "train.keep_last must be at least 1 (resuming needs a checkpoint)");
        ensure!(
            t.schedule != Schedule::Step || (t.gamma > 0.0 && t.gamma <= 1.0),
            "train.gamma = {} must be in (0, 1] for schedule = \"step\"",
            t.gamma
        );
        ensure!(t.schedule != Schedule::Step || t.epochs > 0, "train.schedule = \"step\" decays per epoch: set train.epochs");
        ensure!(
            t.early_stop_patience == 0 || t.eval_each_epoch,
            "train.early_stop_patience counts epoch-end validations: set train.eval_each_epoch = true"
        );
        ensure!((0.0..1.0).contains(&t.betas[0]) && (0.0..1.0).contains(&t.betas[1]), "train.betas must be in [0, 1)");
        ensure!(t.eps > 0.0, "train.eps must be positive");
        ensure!(m.max_seq_len >= 3, "model.max_seq_len = {} is too short (cls + at least 2 genes)", m.max_seq_len);
        ensure!(m.n_bins >= 3, "model.n_bins must be at least 3");
        ensure!(
            ["none", "dsbn", "batchnorm"].contains(&m.domain_spec_batchnorm.as_str()),
            "model.domain_spec_batchnorm = {:?}: expected \"none\", \"dsbn\" or \"batchnorm\"",
            m.domain_spec_batchnorm
        );
        ensure!(
            !self.needs_batch_labels() || !self.data.batch_col.is_empty(),
            "model.use_batch_labels / model.domain_spec_batchnorm read batch labels: set data.batch_col to the obs column with each cell's batch"
        );
        ensure!(
            ["cls", "avg-pool", "w-pool"].contains(&m.cell_emb_style.as_str()),
            "model.cell_emb_style = {:?}: expected \"cls\", \"avg-pool\" or \"w-pool\"",
            m.cell_emb_style
        );
        ensure!(
            ["continuous", "category"].contains(&m.input_emb_style.as_str()),
            "model.input_emb_style = {:?}: expected \"continuous\" or \"category\" (scaling is not used for pretraining)",
            m.input_emb_style
        );
        self.validate_task()?;
        if self.data.input.is_empty() {
            ensure!(
                !self.data.shards.is_empty(),
                "data.shards and data.input are both empty: give scgpt-prep output directories or h5ad files"
            );
            ensure!(
                self.data.weights.is_empty() || self.data.weights.len() == self.data.shards.len(),
                "data.weights has {} entries for {} data.shards",
                self.data.weights.len(),
                self.data.shards.len()
            );
            ensure!(self.valid.input.is_empty(), "valid.input = {:?} needs data.input (h5ad fine-tuning data)", self.valid.input);
        }
        ensure!((0.0..1.0).contains(&self.data.valid_fraction), "data.valid_fraction must be in [0, 1)");
        ensure!(
            crate::device::available().contains(&self.run.device.as_str()),
            "run.device = {:?}: this build has {}; GPU builds need the cuda, wgpu or vulkan feature",
            self.run.device,
            crate::device::available().join(", ")
        );
        ensure!(self.valid.knn_k > 0, "valid.knn_k must be at least 1");
        let p = &self.preprocess;
        ensure!(
            p.filter_gene_by_counts >= 0.0 && p.filter_gene_by_counts.is_finite(),
            "preprocess.filter_gene_by_counts = {} must be a count >= 0",
            p.filter_gene_by_counts
        );
        ensure!(
            ["auto", "seurat_v3", "cell_ranger", "seurat"].contains(&p.hvg_flavor.as_str()),
            "preprocess.hvg_flavor = {:?}: expected \"auto\", \"seurat_v3\", \"cell_ranger\" or \"seurat\"",
            p.hvg_flavor
        );
        ensure!(
            !p.selects_genes() || !self.data.input.is_empty(),
            "[preprocess] selects genes of data.input (h5ad); prepare shard sets with the genes you want instead"
        );
        Ok(())
    }

    /// What each task needs, and the loss-term switches a task would not compute (an error,
    /// never silently ignored).
    fn validate_task(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        let t = &self.train;
        let m = &self.model;
        ensure!(t.dab_weight >= 0.0 && t.dab_weight.is_finite(), "train.dab_weight = {} must be a weight >= 0", t.dab_weight);
        ensure!(
            !m.DAR || !self.data.batch_col.is_empty(),
            "model.DAR = true classifies each cell's batch: set data.batch_col to the obs column with the batches"
        );
        ensure!(
            !self.data.single_batch_minibatches || !self.data.batch_col.is_empty(),
            "data.single_batch_minibatches = true groups cells by data.batch_col: set it to the obs column with the batches"
        );
        let off = |pairs: &[(bool, &str)], why: &str| -> anyhow::Result<()> {
            for (on, key) in pairs {
                ensure!(!on, "{key} = true: {why}; set it to false");
            }
            Ok(())
        };
        match self.task.kind {
            TaskKind::Pretrain => match t.objective {
                Objective::Generative => {
                    ensure!(
                        !t.gen_ratios.is_empty() && t.gen_ratios.iter().all(|r| *r > 0.0 && *r < 1.0),
                        "train.gen_ratios = {:?}: needs values strictly between 0 and 1",
                        t.gen_ratios
                    );
                    off(
                        &[
                            (t.cls, "train.cls"),
                            (t.ecs, "train.ecs"),
                            (t.cce, "train.cce"),
                            (m.DAR, "model.DAR"),
                            (m.explicit_zero_prob, "model.explicit_zero_prob"),
                        ],
                        "the generative objective does not compute that term (train.objective = \"mlm\" does)",
                    )?;
                    off(
                        &[(self.task.include_zero_gene, "task.include_zero_gene")],
                        "the generative objective tokenises the nonzero genes (spec §2.1)",
                    )?;
                }
                Objective::Mlm => {
                    ensure!(t.mask_ratio > 0.0 && t.mask_ratio < 1.0, "train.mask_ratio = {} must be in (0, 1)", t.mask_ratio);
                    ensure!(
                        !t.cls || !self.task.label_col.is_empty(),
                        "train.cls = true needs task.label_col, the obs column with the labels (scgpt-prep --obs-cols)"
                    );
                    off(
                        &[(self.task.include_zero_gene, "task.include_zero_gene")],
                        "pretraining tokenises the nonzero genes (the corpus collator)",
                    )?;
                }
            },
            TaskKind::Annotation => {
                ensure!(
                    !self.task.label_col.is_empty(),
                    "task.kind = \"annotation\" needs task.label_col, the obs column with the cell types"
                );
                off(
                    &[
                        (t.ecs, "train.ecs"),
                        (t.cce, "train.cce"),
                        (m.MVC, "model.MVC"),
                        (m.explicit_zero_prob, "model.explicit_zero_prob"),
                        (m.DAR, "model.DAR"),
                    ],
                    "the annotation task trains the CLS head alone (cross entropy) and does not compute that term",
                )?;
            }
            TaskKind::Integration => {
                ensure!(
                    !self.data.batch_col.is_empty(),
                    "task.kind = \"integration\" needs data.batch_col, the obs column with each cell's batch (sample, donor, technology)"
                );
                ensure!(t.mask_ratio > 0.0 && t.mask_ratio < 1.0, "train.mask_ratio = {} must be in (0, 1)", t.mask_ratio);
                off(
                    &[(t.cce, "train.cce"), (t.cls, "train.cls")],
                    "the integration task trains masked values (+ GEPC, ECS, DAR, zero probabilities) and never reads labels",
                )?;
            }
            TaskKind::Perturbation => {
                ensure!(
                    self.data.input.len() == 1,
                    "task.kind = \"perturbation\" reads one screen: set data.input to its h5ad (GEARS format, e.g. perturb_processed.h5ad)"
                );
                ensure!(
                    matches!(self.task.split.as_str(), "simulation" | "no_test"),
                    "task.split = {:?}: expected \"simulation\" or \"no_test\"",
                    self.task.split
                );
                ensure!(
                    self.valid.input.is_empty(),
                    "task.kind = \"perturbation\" validates on the split's val conditions; leave valid.input empty"
                );
                ensure!(
                    !self.data.control.is_empty() && !self.data.separator.is_empty(),
                    "data.control and data.separator must not be empty"
                );
                off(
                    &[
                        (t.cce, "train.cce"),
                        (t.cls, "train.cls"),
                        (t.ecs, "train.ecs"),
                        (m.DAR, "model.DAR"),
                        (m.MVC, "model.MVC"),
                        (m.explicit_zero_prob, "model.explicit_zero_prob"),
                    ],
                    "the perturbation task trains the expression of the perturbed cell (MSE) and does not compute that term",
                )?;
                ensure!(!self.needs_batch_labels(), "the perturbation model reads no batch labels: leave model.use_batch_labels off and model.domain_spec_batchnorm = \"none\"");
            }
        }
        Ok(())
    }

    /// Reads deprecated spellings into their keys (`train.cls_col` into `task.label_col`).
    pub fn fold_aliases(&mut self) -> anyhow::Result<()> {
        let old = std::mem::take(&mut self.train.cls_col);
        if !old.is_empty() {
            anyhow::ensure!(
                self.task.label_col.is_empty() || self.task.label_col == old,
                "train.cls_col = {old:?} and task.label_col = {:?} disagree; train.cls_col is the old name of task.label_col: keep one",
                self.task.label_col
            );
            self.task.label_col = old;
        }
        Ok(())
    }

    /// Whether the model reads batch labels (the original demands them for any input norm).
    pub fn needs_batch_labels(&self) -> bool {
        self.model.use_batch_labels
            || self.model.domain_spec_batchnorm != "none"
            || self.model.DAR
            || self.task.kind == TaskKind::Integration
    }

    /// The obs columns the run's task reads from the data.
    pub fn label_col(&self) -> Option<&str> {
        let wanted = match self.task.kind {
            TaskKind::Annotation => true,
            TaskKind::Integration | TaskKind::Perturbation => false,
            TaskKind::Pretrain => self.train.objective == Objective::Mlm && self.train.cls,
        };
        (wanted && !self.task.label_col.is_empty()).then_some(self.task.label_col.as_str())
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
        map.remove("init_prefixes");
        if self.model.domain_spec_batchnorm == "none" {
            map.insert("domain_spec_batchnorm".into(), false.into());
        }
        let t = &self.train;
        let generative = self.task.kind == TaskKind::Pretrain && t.objective == Objective::Generative;
        let annotation = self.task.kind == TaskKind::Annotation;
        let integration = self.task.kind == TaskKind::Integration;
        let perturbation = self.task.kind == TaskKind::Perturbation;
        let extra = serde_json::json!({
            "pad_token": "<pad>",
            "n_cls": 1,
            "USE_GENERATIVE_TRAINING": generative,
            "training_tasks": if generative { "both" } else if annotation { "cls" } else if integration { "integration" } else if perturbation { "perturbation" } else { "pcpt" },
            "lr": t.lr,
            "batch_size": t.batch_size,
            "epochs": t.epochs,
            "warmup_ratio_or_step": t.warmup_steps as f64,
            "grad_accu_steps": t.grad_accum,
            "mask_ratio": if generative { serde_json::json!(t.gen_ratios) } else if annotation { serde_json::json!(0.0) } else { serde_json::json!(t.mask_ratio) },
            "USE_CCE": t.cce,
            "ECS": t.ecs,
            "dab_weight": t.dab_weight,
            "include_zero_gene": self.task.include_zero_gene,
            "CLS": t.cls || annotation,
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
    let mut cfg: TrainConfig = layered.build()?;
    cfg.fold_aliases()?;
    cfg.validate()?;
    Ok(cfg)
}
