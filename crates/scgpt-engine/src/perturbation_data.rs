//! A perturbation run's data: the screen (`data.input`, GEARS format) read and checked, its
//! conditions split into train/val/test (GEARS's `simulation` or `no_test`, or
//! `task.split_file`), written to `run.dir/split.json`, and prepared with the scgpt-prep code
//! into two shard sets: `data/train` (control cells and the train conditions' cells) and
//! `data/valid` (the val conditions' cells). Test conditions never reach training.
//!
//! The shard vocabulary is the model's (the `init_from` checkpoint's, or the screen's genes
//! for a fresh model) extended with every screen gene, so each screen gene keeps its values:
//! genes outside the model's vocabulary are fed as `<pad>` tokens, as the original does.
//! `data/screen.json` keeps the screen's genes in column order and the reading options, so the
//! task, `predict-perturbation` and `eval perturbation` agree on them.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context};
use scgpt_data::loader::ShardSet;
use scgpt_data::vocab::GeneVocab;
use scgpt_dist::Collective;
use scgpt_eval::perturbation::{
    no_test_split, simulation_split, Condition, ConditionFormat, NoTestOptions, PerturbationSplit, SimulationOptions,
};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::{toml_str, RunData};
use crate::screen::{Screen, ScreenOptions};

pub const SPLIT_FILE: &str = "split.json";
pub const SCREEN_FILE: &str = "screen.json";

/// What a perturbation run knows of its screen: kept in `run.dir/data/` and `best_model/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScreenSpec {
    /// The screen's gene symbols in column order: the genes the model predicts.
    pub genes: Vec<String>,
    pub options: ScreenOptions,
    /// Conditions left out of the run, with why.
    pub skipped: Vec<(String, String)>,
}

impl ScreenSpec {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a screen spec", path.display()))
    }
}

/// The model vocabulary a run's screen is checked against: `model.init_from`'s, or `None` for
/// a fresh model (its vocabulary is the screen's genes).
pub fn model_vocab(cfg: &TrainConfig) -> anyhow::Result<Option<GeneVocab>> {
    if cfg.model.init_from.is_empty() {
        return Ok(None);
    }
    let p = Path::new(&cfg.model.init_from).join("vocab.json");
    Ok(Some(GeneVocab::from_file(&p).with_context(|| format!("model.init_from: {}", p.display()))?))
}

/// Conditions whose genes the screen or the vocabulary lack, with why; the rest parsed.
pub fn check_conditions(screen: &Screen, vocab: Option<&GeneVocab>) -> anyhow::Result<(Vec<(String, Condition)>, Vec<(String, String)>)> {
    let index = screen.gene_index();
    let names: BTreeSet<&String> = screen.conditions.iter().filter(|c| **c != screen.opts.control).collect();
    let (mut kept, mut skipped) = (Vec::new(), Vec::new());
    for name in names {
        let cond = screen.parse(name)?;
        let missing: Vec<String> = cond.genes().into_iter().filter(|g| !index.contains_key(g)).map(str::to_string).collect();
        let out_of_vocab: Vec<String> =
            cond.genes().into_iter().filter(|g| vocab.is_some_and(|v| v.get(g).is_none())).map(str::to_string).collect();
        if !missing.is_empty() {
            skipped.push((name.clone(), format!("{} not among the screen's genes", missing.join(", "))));
        } else if !out_of_vocab.is_empty() {
            skipped.push((name.clone(), format!("{} not in the model vocabulary", out_of_vocab.join(", "))));
        } else {
            kept.push((name.clone(), cond));
        }
    }
    Ok((kept, skipped))
}

/// The run's split: the one already in the run directory (a resumed run), `task.split_file`,
/// or a new draw over every condition of the screen (`conditions`, in order of first
/// appearance, as GEARS lists them), so a screen splits as GEARS splits it; conditions the run
/// skips stay in the file and are left out when it is used.
fn split_for(
    cfg: &TrainConfig,
    conditions: &[String],
    format: &ConditionFormat,
    run_split: &Path,
) -> anyhow::Result<(PerturbationSplit, String)> {
    if run_split.is_file() {
        let s = PerturbationSplit::load_for_screen(run_split, conditions, format)?;
        return Ok((s, format!("split: {} (kept from the run directory)", run_split.display())));
    }
    if !cfg.task.split_file.is_empty() {
        let p = Path::new(&cfg.task.split_file);
        let s = PerturbationSplit::load_for_screen(p, conditions, format).context("task.split_file")?;
        return Ok((s, format!("split: {} (task.split_file)", p.display())));
    }
    let s = match cfg.task.split.as_str() {
        "simulation" => simulation_split(
            conditions,
            &SimulationOptions {
                seed: cfg.task.split_seed,
                train_gene_set_size: cfg.task.train_gene_set_size,
                combo_seen2_train_frac: cfg.task.combo_seen2_train_frac,
                format: format.clone(),
                ..Default::default()
            },
        )?,
        "no_test" => no_test_split(conditions, &NoTestOptions { seed: cfg.task.split_seed, format: format.clone(), ..Default::default() })?,
        other => bail!("task.split = {other:?}: expected \"simulation\" or \"no_test\""),
    };
    if s.test.is_empty() && cfg.task.split != "no_test" {
        bail!("task.split = {:?} left no test condition among {} conditions; use a screen with more perturbed genes or task.split = \"no_test\"", cfg.task.split, conditions.len());
    }
    Ok((s, format!("split: {} (seed {})", cfg.task.split, cfg.task.split_seed)))
}

/// The screen's non-control conditions in order of first appearance.
pub fn conditions_in_order(screen: &Screen) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    screen.conditions.iter().filter(|c| **c != screen.opts.control && seen.insert(c.as_str())).cloned().collect()
}

/// `list` without the skipped conditions.
pub fn without(list: &[String], skipped: &[(String, String)]) -> Vec<String> {
    list.iter().filter(|c| !skipped.iter().any(|(s, _)| s == *c)).cloned().collect()
}

/// Opens (rank 0 first prepares) a perturbation run's data.
pub fn open(cfg: &TrainConfig, comm: &mut dyn Collective, progress: bool) -> anyhow::Result<RunData> {
    let root = cfg.run.dir.join("data");
    let (train_dir, valid_dir) = (root.join("train"), root.join("valid"));
    let mut notes = Vec::new();
    if comm.rank() == 0 {
        std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
        let input = &cfg.data.input[0];
        let opts = ScreenOptions::from_config(cfg);
        let screen = Screen::read(input, &opts).context("data.input")?;
        notes.extend(screen.notes.iter().cloned());
        let vocab = model_vocab(cfg)?;
        let (_, skipped) = check_conditions(&screen, vocab.as_ref())?;
        if !skipped.is_empty() {
            let list = skipped.iter().map(|(c, why)| format!("{c} ({why})")).collect::<Vec<_>>().join(", ");
            if cfg.data.strict {
                bail!(
                    "{}: {} condition(s) name genes the run cannot perturb: {list}; remove them or set data.strict = false to skip them",
                    input.display(),
                    skipped.len()
                );
            }
            notes.push(format!("warning: {} condition(s) skipped: {list}", skipped.len()));
        }
        let (split, note) = split_for(cfg, &conditions_in_order(&screen), &screen.format(), &cfg.run.dir.join(SPLIT_FILE))?;
        let (train, val) = (without(&split.train, &skipped), without(&split.val, &skipped));
        notes.push(format!("{note}: {} train / {} val / {} test conditions", train.len(), val.len(), without(&split.test, &skipped).len()));
        if val.is_empty() {
            bail!("the split has no val condition (best-model selection needs one); use a screen with more conditions");
        }
        split.save(&cfg.run.dir.join(SPLIT_FILE))?;
        let spec = ScreenSpec { genes: screen.genes.clone(), options: opts.clone(), skipped };
        scgpt_data::atomic::write_bytes(&root.join(SCREEN_FILE), serde_json::to_string_pretty(&spec)?.as_bytes())?;

        // Shards of log-normalised values: the normalised copy when the run normalises.
        let source = if cfg.data.normalize {
            let p = root.join("screen.normalized.h5ad");
            if !p.is_file() {
                write_screen(&screen, &p)?;
            }
            p
        } else {
            input.clone()
        };
        let vocab_path = match &vocab {
            Some(_) => Path::new(&cfg.model.init_from).join("vocab.json"),
            None => {
                let mut v = GeneVocab::from_tokens(Vec::<String>::new());
                v.ensure_specials();
                v.extend(screen.genes.iter().map(String::as_str));
                let p = root.join("screen_vocab.json");
                scgpt_data::atomic::write_bytes(&p, v.to_json().as_bytes())?;
                p
            }
        };
        let gene_col = if cfg.data.normalize { "gene_name".to_string() } else { cfg.data.gene_col.clone() };
        let mut train_conditions = vec![cfg.data.control.clone()];
        train_conditions.extend(train);
        prepare(cfg, &source, &gene_col, &vocab_path, &train_conditions, &train_dir, progress).context("preparing the train conditions")?;
        let valid_vocab = train_dir.join("vocab.json");
        prepare(cfg, &source, &gene_col, &valid_vocab, &val, &valid_dir, progress).context("preparing the val conditions")?;
    }
    comm.barrier()?;
    let train = ShardSet::open(&train_dir, 1.0).context("perturbation train cells")?;
    let valid = ShardSet::open(&valid_dir, 1.0).context("perturbation val cells")?;
    notes.push(format!(
        "data: {} cells of control and train conditions in {}, {} val cells in {}",
        train.cells(),
        train_dir.display(),
        valid.cells(),
        valid_dir.display()
    ));
    Ok(RunData { train: vec![train], valid: Some(vec![valid]), notes })
}

/// scgpt-prep on the cells of `conditions`, every screen gene kept with its log-normalised
/// value.
fn prepare(
    cfg: &TrainConfig,
    input: &Path,
    gene_col: &str,
    vocab: &Path,
    conditions: &[String],
    out: &Path,
    progress: bool,
) -> anyhow::Result<()> {
    use scgpt_config::{Layered, Origin};
    let list = conditions.iter().map(|c| toml_str(c)).collect::<Vec<_>>().join(", ");
    let filter = format!("{} in [{list}]", cfg.data.condition_col);
    let sets = vec![
        format!("input.paths=[{}]", toml_str(&input.display().to_string())),
        format!("input.gene_col={}", toml_str(gene_col)),
        "input.matrix=\"x\"".to_string(),
        "input.allow_non_integer=true".to_string(),
        "filter.gene_min_counts_per_10k_cells=0.0".to_string(),
        format!("filter.obs=[{}]", toml_str(&filter)),
        format!("output.dir={}", toml_str(&out.display().to_string())),
        format!("output.obs_cols=[{}]", toml_str(&cfg.data.condition_col)),
        format!("vocab.path={}", toml_str(&vocab.display().to_string())),
        "vocab.build=true".to_string(),
        format!("binning.seed={}", cfg.run.seed),
        format!("run.progress={progress}"),
    ];
    let layered = Layered::new().with_toml_str(scgpt_prep::config::DEFAULTS_TOML, Origin::Defaults)?.with_sets(&sets)?;
    let prep: scgpt_prep::config::PrepConfig = layered.build()?;
    scgpt_prep::pipeline::Prep::new(prep)?.run()?;
    Ok(())
}

/// The screen's (normalised) matrix with its condition column and gene names, as an h5ad.
pub fn write_screen(screen: &Screen, path: &Path) -> anyhow::Result<()> {
    use scgpt_data::h5ad::{Column, Frame, H5adWriter};
    let mut w = H5adWriter::create(path, screen.n_genes())?;
    w.append_rows(&screen.x.indptr, &screen.x.indices, &screen.x.data)?;
    let obs = Frame {
        index: (0..screen.n_cells()).map(|i| format!("cell{i}")).collect(),
        columns: vec![(screen.opts.condition_col.clone(), Column::categorical_from(&screen.conditions))],
    };
    let var = Frame { index: screen.var_index.clone(), columns: vec![("gene_name".to_string(), Column::Strings(screen.genes.clone()))] };
    w.finish(&obs, &var)?;
    Ok(())
}
