//! `scgpt-prep` configuration: TOML sections mirrored by command-line flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The defaults, embedded so a run without `--config` is fully specified.
pub const DEFAULTS_TOML: &str = include_str!("../../configs/prep_defaults.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrepConfig {
    pub input: InputConfig,
    pub vocab: VocabConfig,
    pub filter: FilterConfig,
    pub binning: BinningConfig,
    pub output: OutputConfig,
    pub run: RunConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// h5ad files, or directories whose `*.h5ad` files are all taken.
    pub paths: Vec<PathBuf>,
    /// var column holding gene names (CELLxGENE: `feature_name`); empty = the var index.
    pub gene_col: String,
    /// `auto` (raw/X when present, else X) or `x`.
    pub matrix: String,
    /// Accept values that are not integer counts (log-normalised input).
    pub allow_non_integer: bool,
    /// Report and skip a bad file instead of failing the run.
    pub skip_bad_files: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VocabConfig {
    /// `vocab.json` in the original's format; empty = the shipped whole-human vocabulary.
    pub path: String,
    /// Extend the vocabulary with every gene of the inputs (new genes appended, old ids kept).
    pub build: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Per-file gene filter as the original's corpus build: a gene is kept when its total count
    /// in the file is at least this many per 10,000 cells (3 in the original: 60 per 200k cells).
    pub gene_min_counts_per_10k_cells: f64,
    /// Cells with fewer expressed (kept) genes are dropped; cells with no counts always are.
    pub min_genes_per_cell: usize,
    /// obs filters, all of which must hold: `col == "v"`, `col != "v"`, `col in ["a", "b"]`,
    /// `col not in [...]`.
    pub obs: Vec<String>,
    /// Keep only these genes (var names as `input.gene_col` gives them); empty = every gene.
    /// Fine-tuning runs pass their `[preprocess]` selection (gene filter, HVGs) here.
    #[serde(default)]
    pub genes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BinningConfig {
    pub n_bins: usize,
    /// Seeds tie-breaking; every cell draws from its own stream keyed by (seed, file, row).
    pub seed: u64,
    /// Break ties to the lowest tied bin instead of at random.
    pub deterministic: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub dir: PathBuf,
    pub shard_cells: usize,
    /// obs columns copied into the shards as dictionary-encoded strings.
    pub obs_cols: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Worker threads; 0 = all cores.
    pub workers: usize,
    /// Cells read from HDF5 per block: bounds memory whatever the file size.
    pub block_cells: usize,
    /// Read uncompressed CSR arrays with O_DIRECT, past the page cache (a cold 1M-cell file on
    /// the benchmark VM: 3 s of kernel time instead of 73 s), except the stretches the cache
    /// already holds (a file just downloaded or written), which are copied from it.
    pub direct_io: bool,
    /// Seconds between syncs of finished shards (fsync, then the progress record that names
    /// them); 0 = after every shard. Each sync is a device flush, which on the benchmark VM
    /// stalled all reads for 0.3-1.5 s: once per shard it cost 1-11 s of a 25 s run. A killed
    /// run resumes at the last sync and rewrites the shards after it.
    pub sync_every_s: f64,
    pub progress: bool,
}

impl PrepConfig {
    /// Checks that need no input files.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.input.paths.is_empty(), "no input: pass --input <file.h5ad|dir> or set input.paths");
        anyhow::ensure!(
            (2..=256).contains(&self.binning.n_bins),
            "binning.n_bins = {} must be in 2..=256 (bins are stored as uint8)",
            self.binning.n_bins
        );
        anyhow::ensure!(self.output.shard_cells > 0, "output.shard_cells must be positive");
        anyhow::ensure!(
            self.run.sync_every_s >= 0.0 && self.run.sync_every_s.is_finite(),
            "run.sync_every_s = {} must be a number of seconds >= 0",
            self.run.sync_every_s
        );
        anyhow::ensure!(self.run.block_cells > 0, "run.block_cells must be positive");
        anyhow::ensure!(
            matches!(self.input.matrix.as_str(), "auto" | "x"),
            "input.matrix = {:?}: expected \"auto\" (raw/X, else X) or \"x\"",
            self.input.matrix
        );
        for f in &self.filter.obs {
            crate::obs_filter::ObsFilter::parse(f)?;
        }
        Ok(())
    }
}
