//! Command line: `scgpt-prep [--config F] [flags]`, `scgpt-prep inspect DIR`, `scgpt-prep simulate ...`,
//! `scgpt-prep simulate-perturbation ...`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use scgpt_config::{Layered, Origin};

use crate::config::{PrepConfig, DEFAULTS_TOML};

#[derive(Debug, Parser)]
#[command(
    name = "scgpt-prep",
    version,
    about = "Shard h5ad files into binned Parquet shards for scGPT",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Summarise a shard directory: cells, genes per cell, labels, vocabulary coverage.
    Inspect {
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic CELLxGENE-shaped h5ad with planted cell types, batches and programs.
    Simulate(crate::simulate::SimulateArgs),
    /// Write a simulated Perturb-seq screen in the GEARS format, with a planted network and its truth JSON.
    SimulatePerturbation(crate::simulate_perturbation::SimulatePerturbationArgs),
    /// A batch effect planted into real cells (known truth for integration benchmarks).
    PlantBatch(crate::plant_batch::PlantBatchArgs),
}

#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// TOML config (see configs/prep_example.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config key: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Input h5ad files or directories of them.
    #[arg(long, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// vocab.json (default: the shipped whole-human vocabulary).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Extend the vocabulary with the inputs' genes (or build one when --vocab is not given).
    #[arg(long)]
    pub build_vocab: bool,
    /// var column with gene names (CELLxGENE: feature_name).
    #[arg(long)]
    pub gene_col: Option<String>,
    /// obs columns to copy into the shards, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub obs_cols: Option<Vec<String>>,
    #[arg(long)]
    pub shard_cells: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Break binning ties to the lowest tied bin (identical output on every run).
    #[arg(long)]
    pub deterministic: bool,
    /// Accept non-integer values (log-normalised input).
    #[arg(long)]
    pub allow_non_integer: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// Defaults < config file < SCGPT__* environment < --set < dedicated flags.
    pub fn resolve(&self) -> anyhow::Result<(PrepConfig, toml::Table)> {
        let mut layered = Layered::new().with_toml_str(DEFAULTS_TOML, Origin::Defaults)?;
        if let Some(p) = &self.config {
            layered = layered.with_file(p)?;
        }
        let layered = layered.with_env("SCGPT", std::env::vars())?.with_sets(&self.sets)?;
        let mut cfg: PrepConfig = layered.build()?;
        if !self.input.is_empty() {
            cfg.input.paths = self.input.clone();
        }
        if let Some(o) = &self.out {
            cfg.output.dir = o.clone();
        }
        if let Some(v) = &self.vocab {
            cfg.vocab.path = v.display().to_string();
        }
        cfg.vocab.build |= self.build_vocab;
        if let Some(g) = &self.gene_col {
            cfg.input.gene_col = g.clone();
        }
        if let Some(c) = &self.obs_cols {
            cfg.output.obs_cols = c.iter().filter(|s| !s.is_empty()).cloned().collect();
        }
        if let Some(n) = self.shard_cells {
            cfg.output.shard_cells = n;
        }
        if let Some(s) = self.seed {
            cfg.binning.seed = s;
        }
        cfg.binning.deterministic |= self.deterministic;
        cfg.input.allow_non_integer |= self.allow_non_integer;
        if let Some(w) = self.workers {
            cfg.run.workers = w;
        }
        if self.quiet {
            cfg.run.progress = false;
        }
        let table = layered.table().clone();
        Ok((cfg, table))
    }
}
