//! Where a run's cells come from: scgpt-prep shard sets (`data.shards`, large corpora), or
//! h5ad files (`data.input`, `valid.input`) prepared into `run.dir/data/` with the scgpt-prep
//! code, so a user goes from an h5ad to a fine-tuned model in one command. Preparation is
//! resumable as scgpt-prep is: a rerun (a resumed run) skips the files already done.

use std::path::{Path, PathBuf};

use anyhow::Context;
use scgpt_data::loader::ShardSet;
use scgpt_dist::Collective;

use crate::config::TrainConfig;

pub struct RunData {
    pub train: Vec<ShardSet>,
    /// A separate validation set (`valid.input`); `None` = a split of `train`.
    pub valid: Option<Vec<ShardSet>>,
    pub notes: Vec<String>,
}

/// The vocabulary the inputs are prepared with: the checkpoint's when fine-tuning one (genes
/// outside it could not be embedded), otherwise one built from the data's genes alone (a
/// model trained from scratch needs no rows for genes it never sees).
fn vocab_keys(cfg: &TrainConfig) -> Vec<String> {
    let vocab = Path::new(&cfg.model.init_from).join("vocab.json");
    if !cfg.model.init_from.is_empty() && vocab.is_file() {
        vec![format!("vocab.path={}", toml_str(&vocab.display().to_string()))]
    } else {
        vec!["vocab.build=true".to_string()]
    }
}

/// A string as a TOML value (quoted and escaped), for `--set`-style overrides.
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// scgpt-prep on `inputs` into `out`, keeping the task's obs columns. Fine-tuning keeps every
/// gene of the input (no corpus gene filter, as the tutorials' `filter_gene_by_counts=False`).
fn prepare(
    cfg: &TrainConfig,
    inputs: &[PathBuf],
    out: &Path,
    vocab: Vec<String>,
    genes: Option<&[String]>,
    progress: bool,
) -> anyhow::Result<()> {
    use scgpt_config::{Layered, Origin};
    let paths: Vec<String> = inputs.iter().map(|p| toml_str(&p.display().to_string())).collect();
    let mut obs: Vec<String> = cfg.label_col().map(toml_str).into_iter().collect();
    if cfg.needs_batch_labels() && !obs.contains(&toml_str(&cfg.data.batch_col)) {
        obs.push(toml_str(&cfg.data.batch_col));
    }
    let mut sets = vec![
        format!("input.paths=[{}]", paths.join(",")),
        format!("input.gene_col={}", toml_str(&cfg.data.gene_col)),
        format!("input.allow_non_integer={}", cfg.data.allow_non_integer),
        "filter.gene_min_counts_per_10k_cells=0.0".to_string(),
        format!("output.dir={}", toml_str(&out.display().to_string())),
        format!("output.obs_cols=[{}]", obs.join(",")),
        format!("binning.seed={}", cfg.run.seed),
        format!("binning.deterministic={}", cfg.run.deterministic),
        format!("run.progress={progress}"),
    ];
    sets.extend(vocab);
    if let Some(g) = genes {
        sets.push(format!("filter.genes=[{}]", g.iter().map(|n| toml_str(n)).collect::<Vec<_>>().join(",")));
    }
    let layered = Layered::new().with_toml_str(scgpt_prep::config::DEFAULTS_TOML, Origin::Defaults)?.with_sets(&sets)?;
    let prep: scgpt_prep::config::PrepConfig = layered.build()?;
    scgpt_prep::pipeline::Prep::new(prep)?.run()?;
    Ok(())
}

/// The `[preprocess]` gene selection of the run (computed once and kept in `root`, so a
/// resumed run prepares the same genes), or `None` when it selects nothing.
fn select(cfg: &TrainConfig, root: &Path) -> anyhow::Result<Option<crate::preprocess::GeneSelection>> {
    if !cfg.preprocess.selects_genes() {
        return Ok(None);
    }
    if let Some(saved) = crate::preprocess::load(root)? {
        if saved.request == crate::preprocess::request(cfg) {
            return Ok(Some(saved));
        }
    }
    let vocab_path = Path::new(&cfg.model.init_from).join("vocab.json");
    let vocab = if !cfg.model.init_from.is_empty() && vocab_path.is_file() {
        Some(scgpt_data::vocab::GeneVocab::from_file(&vocab_path)?)
    } else {
        None
    };
    let s = crate::preprocess::select_genes(cfg, vocab.as_ref())?;
    scgpt_data::atomic::write_bytes(&root.join(crate::preprocess::SELECTION_FILE), serde_json::to_string_pretty(&s)?.as_bytes())?;
    Ok(Some(s))
}

/// Opens (and, for h5ad inputs, first prepares on rank 0) the run's data.
pub fn open(cfg: &TrainConfig, comm: &mut dyn Collective, progress: bool) -> anyhow::Result<RunData> {
    if cfg.task.kind == crate::config::TaskKind::Perturbation {
        return crate::perturbation_data::open(cfg, comm, progress);
    }
    let mut notes = Vec::new();
    if cfg.data.input.is_empty() {
        let weights = if cfg.data.weights.is_empty() { vec![1.0; cfg.data.shards.len()] } else { cfg.data.weights.clone() };
        let mut train = Vec::new();
        for (dir, w) in cfg.data.shards.iter().zip(&weights) {
            train.push(ShardSet::open(dir, *w).with_context(|| format!("data.shards: {}", dir.display()))?);
        }
        return Ok(RunData { train, valid: None, notes });
    }
    for p in cfg.data.input.iter().chain(std::iter::once(&PathBuf::from(&cfg.valid.input)).filter(|p| !p.as_os_str().is_empty())) {
        anyhow::ensure!(p.is_file(), "{}: input h5ad not found (data.input / valid.input)", p.display());
    }
    let root = cfg.run.dir.join("data");
    let (train_dir, valid_dir) = (root.join("train"), root.join("valid"));
    if comm.rank() == 0 {
        std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
        let selection = select(cfg, &root)?;
        if let Some(s) = &selection {
            notes.push(format!(
                "preprocess: {} genes kept (vocabulary{}{})",
                s.genes.len(),
                if s.filter_gene_by_counts > 0.0 { format!(", >= {} counts", s.filter_gene_by_counts) } else { String::new() },
                s.hvg_flavor
                    .as_ref()
                    .map(|f| format!(", {} HVGs {f}{}", s.hvg, s.hvg_batch_col.as_ref().map(|b| format!(" per {b}")).unwrap_or_default()))
                    .unwrap_or_default()
            ));
        }
        let genes = selection.as_ref().map(|s| s.genes.as_slice());
        prepare(cfg, &cfg.data.input, &train_dir, vocab_keys(cfg), genes, progress).context("data.input")?;
        if !cfg.valid.input.is_empty() {
            // The training set's vocabulary, so ids agree.
            let vocab = vec![format!("vocab.path={}", toml_str(&train_dir.join("vocab.json").display().to_string()))];
            prepare(cfg, &[PathBuf::from(&cfg.valid.input)], &valid_dir, vocab, genes, progress).context("valid.input")?;
        }
    }
    comm.barrier()?;
    let train = vec![ShardSet::open(&train_dir, 1.0).context("data.input")?];
    notes.push(format!(
        "data: {} prepared into {} ({} cells)",
        cfg.data.input.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        train_dir.display(),
        train[0].cells()
    ));
    let valid = if cfg.valid.input.is_empty() {
        None
    } else {
        let v = ShardSet::open(&valid_dir, 1.0).context("valid.input")?;
        notes.push(format!("validation: {} prepared into {} ({} cells)", cfg.valid.input, valid_dir.display(), v.cells()));
        Some(vec![v])
    };
    Ok(RunData { train, valid, notes })
}

/// Model ids of the genes with a nonzero value in some cell of `sets` (ascending): the tokens
/// of every cell under `include_zero_gene`. A gene that is zero in every cell of the data (or
/// left out by the preparation) carries nothing and is not one of them.
pub fn expressed_genes(sets: &[ShardSet], maps: &[Vec<Option<u32>>]) -> anyhow::Result<Vec<u32>> {
    let mut seen = std::collections::BTreeSet::new();
    for (set, map) in sets.iter().zip(maps) {
        for (path, groups) in &set.shards {
            for g in 0..groups.len() {
                let cells = scgpt_data::shard::read_row_group(path, g, &[])?;
                for (&gene, &v) in cells.genes.iter().zip(&cells.expressions) {
                    if let (true, Some(Some(id))) = (v > 0.0, map.get(gene as usize)) {
                        seen.insert(*id);
                    }
                }
            }
        }
    }
    Ok(seen.into_iter().collect())
}
