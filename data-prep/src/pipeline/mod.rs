//! The sharding pipeline: h5ad files in, binned Parquet shards plus a manifest out.
//!
//! Per file: match genes to the vocabulary, evaluate obs filters, decide the per-file gene
//! filter, then stream row blocks from reader threads while rayon bins cells, cutting shards of
//! `shard_cells` kept cells. The gene filter reads only the column indices where it can (a gene
//! stored in n cells totals at least n counts), plus the values of the genes stored in too few
//! cells to settle that way; the binning pass then checks every stored value, and a value
//! below 1 (an explicit zero, a fraction) has the file checked against exact totals and binned
//! again if that changes any gene's fate. Non-integer input takes the exact totals directly.
//! Every cell draws its tie-breaking from its own RNG stream keyed by (seed, file, row), so the
//! output does not depend on threads, block size, or where a resumed run picked up.
//!
//! Resumability: after each shard, `.progress/<stem>.json` records the shards written so far and
//! the source row where the next shard starts. A rerun skips finished files, resumes unfinished
//! ones at their last shard, and redoes a file from scratch if its source or the settings changed.

mod bin_pass;
mod gene_filter;
mod row_scan;

use bin_pass::FilePass;
use gene_filter::GeneRule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use scgpt_data::atomic;
use scgpt_data::binning::{Binner, TieBreak, SMALL_INT_LIMIT};
use scgpt_data::h5ad::{H5adReader, MatrixChoice, ObsNames, RowBlock};
use scgpt_data::seed::{hash_str, SplitMix64};
use scgpt_data::shard::ShardInfo;
use scgpt_data::small_int;
use scgpt_data::vocab::{hex, match_genes, EnsemblTable, GeneMatch, GeneVocab};

use crate::config::PrepConfig;
use crate::io::csr_reader::CsrReader;
use crate::io::shard_writer::{CellLists, ShardWriter};
use crate::obs_filter::ObsFilter;

pub const MANIFEST: &str = "manifest.json";
pub const VOCAB_FILE: &str = "vocab.json";
const PROGRESS_DIR: &str = ".progress";
/// 2: shard checksums are BLAKE3 (`blake3`), 4x cheaper than SHA-256 here, which was 13% of the
/// CPU of a run.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub size: u64,
    pub mtime_unix_ns: u128,
}

impl SourceInfo {
    fn of(path: &Path) -> anyhow::Result<Self> {
        let md = std::fs::metadata(path).with_context(|| format!("{}: file not found", path.display()))?;
        let mtime = md.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(SourceInfo { path: path.display().to_string(), size: md.len(), mtime_unix_ns: mtime })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    #[serde(flatten)]
    pub info: ShardInfo,
    /// Source row after the last cell of this shard: where the next shard's scan starts.
    pub row_end: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileStats {
    pub cells_in: usize,
    pub cells_out: usize,
    pub cells_dropped_obs_filter: usize,
    pub cells_dropped_few_genes: usize,
    pub genes_in: usize,
    pub genes_in_vocab: usize,
    pub genes_matched_via_ensembl: usize,
    pub genes_kept: usize,
}

/// Per-file progress, the unit of resumption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub dataset: String,
    pub source: SourceInfo,
    pub settings_hash: String,
    pub shards: Vec<ShardRecord>,
    pub complete: bool,
    pub stats: FileStats,
    /// The shards were binned with the gene filter from exact totals (see [`GeneRule`]).
    #[serde(default)]
    pub exact_gene_filter: bool,
    /// A stored value below 1 was seen in the rows before the last recorded shard's end.
    #[serde(default)]
    pub values_below_one: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedFile {
    pub path: String,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct RunSummary {
    pub files_done: usize,
    pub files_resumed_or_skipped: usize,
    pub cells_out: usize,
    pub cells_in: usize,
    pub skipped: Vec<SkippedFile>,
    pub seconds: f64,
}

/// Expand directories to their `*.h5ad` files (sorted) and check dataset names are unique.
pub fn resolve_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list directory", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "h5ad"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{}: directory has no .h5ad files", p.display());
            }
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut out = Vec::new();
    for f in files {
        let stem = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(prev) = seen.insert(stem.clone(), f.clone()) {
            bail!(
                "{} and {} share the dataset name `{stem}` (the file stem names shards and the `dataset` column); rename one",
                prev.display(),
                f.display()
            );
        }
        out.push((f, stem));
    }
    Ok(out)
}

pub struct Prep {
    cfg: PrepConfig,
    vocab: GeneVocab,
    ensembl: EnsemblTable,
    filters: Vec<ObsFilter>,
    settings_hash: String,
    out: PathBuf,
}

impl Prep {
    pub fn new(cfg: PrepConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let ensembl = EnsemblTable::human();
        let mut vocab = if cfg.vocab.path.is_empty() {
            if cfg.vocab.build {
                GeneVocab::from_tokens(Vec::<String>::new())
            } else {
                GeneVocab::human()
            }
        } else {
            GeneVocab::from_file(Path::new(&cfg.vocab.path))?
        };
        if cfg.vocab.build {
            let inputs = resolve_inputs(&cfg.input.paths)?;
            let mut added = 0;
            for (path, _) in &inputs {
                let r = match H5adReader::open(path, matrix_choice(&cfg)) {
                    Ok(r) => r,
                    Err(e) if cfg.input.skip_bad_files => {
                        eprintln!("warning: --build-vocab skips {}: {e}", path.display());
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let names = r.var_names(gene_col(&cfg))?;
                let m = match_genes(&names, &vocab, Some(&ensembl));
                let listed = gene_list(&cfg);
                let new: Vec<&str> = names
                    .iter()
                    .zip(&m.ids)
                    .filter(|(n, id)| id.is_none() && listed.as_ref().is_none_or(|l| l.contains(n.as_str())))
                    .map(|(n, _)| n.as_str())
                    .collect();
                added += vocab.extend(new);
            }
            vocab.ensure_specials();
            eprintln!("vocabulary: {} tokens ({added} genes added from the inputs)", vocab.len());
        }
        let filters = cfg.filter.obs.iter().map(|f| ObsFilter::parse(f)).collect::<anyhow::Result<Vec<_>>>()?;
        let settings_hash = settings_hash(&cfg, &vocab);
        let out = cfg.output.dir.clone();
        Ok(Prep { cfg, vocab, ensembl, filters, settings_hash, out })
    }

    pub fn vocab(&self) -> &GeneVocab {
        &self.vocab
    }

    pub fn run(&self) -> anyhow::Result<RunSummary> {
        let t0 = std::time::Instant::now();
        let inputs = resolve_inputs(&self.cfg.input.paths)?;
        std::fs::create_dir_all(self.out.join(PROGRESS_DIR))
            .with_context(|| format!("{}: cannot create output directory", self.out.display()))?;
        atomic::remove_stale_temps(&self.out)?;
        atomic::remove_stale_temps(&self.out.join(PROGRESS_DIR))?;
        let vocab_json = self.vocab.to_json();
        let vocab_path = self.out.join(VOCAB_FILE);
        if std::fs::read_to_string(&vocab_path).ok().as_deref() != Some(vocab_json.as_str()) {
            atomic::write_bytes(&vocab_path, vocab_json.as_bytes()).with_context(|| format!("{}: cannot write", vocab_path.display()))?;
        }

        // Sizes up front for the progress bar; a file that cannot be opened counts as 0 here
        // and reports its error when processed.
        let total: u64 =
            inputs.iter().map(|(p, _)| H5adReader::count_cells(p, matrix_choice(&self.cfg)).map(|n| n as u64).unwrap_or(0)).sum();
        let bar = progress_bar(total, self.cfg.run.progress);
        let processed = AtomicU64::new(0);

        // Files run on plain threads, never on rayon workers: each file's pipeline blocks on its
        // own reader and writer threads, and the writer uses rayon to encode columns, so a rayon
        // worker blocked on a file would starve the pool it is waiting for.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<anyhow::Result<(FileRecord, bool)>>>> =
            inputs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let file_workers = inputs.len().min(rayon::current_num_threads()).max(1);
        std::thread::scope(|scope| {
            for _ in 0..file_workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((path, stem)) = inputs.get(i) else { break };
                    let res = self.process_file(path, stem, &bar, &processed);
                    *slots[i].lock().expect("no poisoning: workers do not panic while holding it") = Some(res);
                });
            }
        });
        let results: Vec<(PathBuf, anyhow::Result<(FileRecord, bool)>)> = inputs
            .iter()
            .zip(slots)
            .map(|((path, _), slot)| {
                let res = slot.into_inner().ok().flatten().unwrap_or_else(|| Err(anyhow::anyhow!("worker for this file stopped early")));
                (path.clone(), res)
            })
            .collect();
        bar.finish_and_clear();

        let mut summary = RunSummary::default();
        let mut records = Vec::new();
        for (path, res) in results {
            match res {
                Ok((rec, fresh)) => {
                    if fresh {
                        summary.files_done += 1;
                    } else {
                        summary.files_resumed_or_skipped += 1;
                    }
                    summary.cells_in += rec.stats.cells_in;
                    summary.cells_out += rec.stats.cells_out;
                    records.push(rec);
                }
                Err(e) if self.cfg.input.skip_bad_files => {
                    eprintln!("warning: skipped {}: {e:#}", path.display());
                    summary.skipped.push(SkippedFile { path: path.display().to_string(), error: format!("{e:#}") });
                }
                Err(e) => {
                    return Err(
                        e.context(format!("{}: failed; fix it, or set input.skip_bad_files = true to skip bad files", path.display()))
                    )
                }
            }
        }
        if records.iter().all(|r| r.stats.cells_out == 0) {
            bail!(
                "nothing left after filtering: {} input file(s) gave 0 cells; loosen filter.min_genes_per_cell, filter.obs or the gene filter",
                records.len() + summary.skipped.len()
            );
        }
        self.write_manifest(&records, &summary.skipped)?;
        summary.seconds = t0.elapsed().as_secs_f64();
        Ok(summary)
    }

    fn progress_path(&self, stem: &str) -> PathBuf {
        self.out.join(PROGRESS_DIR).join(format!("{stem}.json"))
    }

    fn load_record(&self, stem: &str) -> Option<FileRecord> {
        let text = std::fs::read_to_string(self.progress_path(stem)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save_record(&self, rec: &FileRecord) -> anyhow::Result<()> {
        let p = self.progress_path(&rec.dataset);
        atomic::write_bytes(&p, serde_json::to_string_pretty(rec)?.as_bytes())
            .with_context(|| format!("{}: cannot write progress", p.display()))
    }

    /// Returns the file's record and whether any work was done on it in this run.
    fn process_file(&self, path: &Path, stem: &str, bar: &ProgressBar, processed: &AtomicU64) -> anyhow::Result<(FileRecord, bool)> {
        let source = SourceInfo::of(path)?;
        let previous = self.load_record(stem).filter(|r| r.source == source && r.settings_hash == self.settings_hash);
        if let Some(rec) = &previous {
            if rec.complete && rec.shards.iter().all(|s| self.out.join(&s.info.file).exists()) {
                bar.inc(rec.stats.cells_in as u64);
                return Ok((rec.clone(), false));
            }
        }

        let mut reader = CsrReader::open(path, matrix_choice(&self.cfg))?;
        if self.cfg.run.direct_io {
            reader.use_direct_io();
        }
        let n_obs = reader.n_obs();
        let names = reader.var_names(gene_col(&self.cfg))?;
        let mut gm = match_genes(&names, &self.vocab, Some(&self.ensembl));
        check_gene_match(path, &reader, &names, &gm, &self.cfg)?;
        if let Some(listed) = gene_list(&self.cfg) {
            for (id, n) in gm.ids.iter_mut().zip(&names) {
                if !listed.contains(n.as_str()) {
                    *id = None;
                }
            }
        }

        let mut keep_cell = vec![true; n_obs];
        for f in &self.filters {
            let col = reader.obs_column(&f.column)?;
            for (k, v) in keep_cell.iter_mut().zip(&col) {
                *k &= f.keeps(v);
            }
        }
        let obs_values: Vec<Vec<String>> = self.cfg.output.obs_cols.iter().map(|c| reader.obs_column(c)).collect::<Result<_, _>>()?;
        let cell_ids = reader.obs_index()?;
        let hint = |row: usize| reader_path_hint(&cell_ids, row);

        let exact_only = previous.as_ref().is_some_and(|r| r.exact_gene_filter);
        let resumed_below_one = previous.as_ref().is_some_and(|r| r.values_below_one);
        let filter_start = std::time::Instant::now();
        let (mut gene_ids, rule) = self.gene_filter(&mut reader, &gm, &names, &hint, exact_only)?;
        let filter_secs = filter_start.elapsed().as_secs_f64();
        let binning_start = std::time::Instant::now();

        // Resume at the last finished shard of an interrupted run, else start clean.
        let shards: Vec<ShardRecord> = match previous {
            Some(rec) => rec.shards.into_iter().take_while(|s| self.out.join(&s.info.file).exists()).collect(),
            None => {
                self.remove_shards_of(stem)?;
                Vec::new()
            }
        };
        let start_row = shards.last().map(|s| s.row_end).unwrap_or(0);
        bar.inc(start_row as u64);
        processed.fetch_add(start_row as u64, Ordering::Relaxed);

        let mut rec = FileRecord {
            dataset: stem.to_string(),
            source: source.clone(),
            settings_hash: self.settings_hash.clone(),
            shards: shards.clone(),
            complete: false,
            stats: FileStats::default(),
            exact_gene_filter: rule == GeneRule::Exact,
            values_below_one: resumed_below_one,
        };
        let file =
            FilePass { stem, path, n_obs, names: &names, hint: &hint, keep_cell: &keep_cell, obs_values: &obs_values, cell_ids: &cell_ids };
        let (mut shards, mut cells_written, below_one) =
            self.bin_pass(&file, &mut reader, start_row, &gene_ids, rule == GeneRule::Counted, shards, &mut rec, Some(bar), processed)?;
        if rule == GeneRule::Counted && (below_one || resumed_below_one) {
            // The counted filter assumed every stored value is at least 1; with explicit zeros
            // or fractions it may keep a gene whose total is below the threshold. Check against
            // exact totals, and redo the file if any gene's fate differs.
            let exact = self.exact_gene_filter(&mut reader, &gm, &names, &hint)?;
            if exact != gene_ids {
                eprintln!("{stem}: stored values below 1 change the gene filter's outcome; binning the file again with exact gene totals");
                self.remove_shards_of(stem)?;
                rec.shards.clear();
                rec.exact_gene_filter = true;
                rec.values_below_one = false;
                self.save_record(&rec)?;
                gene_ids = exact;
                (shards, cells_written, _) =
                    self.bin_pass(&file, &mut reader, 0, &gene_ids, false, Vec::new(), &mut rec, None, processed)?;
            }
        }
        let cells_dropped_obs_filter = keep_cell.iter().filter(|k| !**k).count();
        let stats = FileStats {
            cells_in: n_obs,
            genes_in: names.len(),
            genes_in_vocab: gm.matched(),
            genes_matched_via_ensembl: gm.by_ensembl,
            genes_kept: gene_ids.iter().filter(|g| g.is_some()).count(),
            cells_dropped_obs_filter,
            cells_out: cells_written,
            // Derived from totals, so the record is the same with or without a resume.
            cells_dropped_few_genes: n_obs - cells_dropped_obs_filter - cells_written,
        };
        rec.shards = shards;
        rec.stats = stats;
        rec.complete = true;
        self.save_record(&rec)?;
        if !bar.is_hidden() {
            // The two passes over the file: which one bounds the run (disk or cores) shows here.
            bar.println(format!(
                "{stem}: {} of {} cells kept, {} shard(s); gene filter pass {filter_secs:.1} s, binning pass {:.1} s",
                rec.stats.cells_out,
                n_obs,
                rec.shards.len(),
                binning_start.elapsed().as_secs_f64()
            ));
        }
        Ok((rec, true))
    }

    fn remove_shards_of(&self, stem: &str) -> anyhow::Result<()> {
        let prefix = format!("{stem}.");
        for entry in std::fs::read_dir(&self.out)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".parquet") && is_shard_name(&name, stem) {
                std::fs::remove_file(self.out.join(&name))?;
            }
        }
        Ok(())
    }

    fn write_manifest(&self, records: &[FileRecord], skipped: &[SkippedFile]) -> anyhow::Result<()> {
        let shards: Vec<serde_json::Value> = records
            .iter()
            .flat_map(|r| {
                r.shards.iter().map(move |s| {
                    serde_json::json!({
                        "file": s.info.file, "rows": s.info.rows, "bytes": s.info.bytes,
                        "blake3": s.info.blake3, "dataset": r.dataset,
                    })
                })
            })
            .collect();
        let sources: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "dataset": r.dataset, "path": r.source.path, "size": r.source.size,
                    "mtime_unix_ns": r.source.mtime_unix_ns.to_string(), "stats": r.stats,
                    "shards": r.shards.iter().map(|s| &s.info.file).collect::<Vec<_>>(),
                })
            })
            .collect();
        let total: usize = records.iter().map(|r| r.stats.cells_out).sum();
        let manifest = serde_json::json!({
            "format": "scgpt-rs binned cell shards",
            "format_version": FORMAT_VERSION,
            "tool": format!("scgpt-prep {}", env!("CARGO_PKG_VERSION")),
            "total_cells": total,
            "n_bins": self.cfg.binning.n_bins,
            "columns": ["genes", "expressions", "bins", "n_counts", "cell_id", "dataset"],
            "obs_cols": self.cfg.output.obs_cols,
            "vocab": { "file": VOCAB_FILE, "tokens": self.vocab.len(), "sha256": self.vocab.content_hash() },
            "settings_hash": self.settings_hash,
            "shards": shards,
            "sources": sources,
            "skipped_files": skipped,
            "config": self.cfg,
        });
        let path = self.out.join(MANIFEST);
        atomic::write_bytes(&path, serde_json::to_string_pretty(&manifest)?.as_bytes())
            .with_context(|| format!("{}: cannot write manifest", path.display()))
    }
}

/// Tests of resumption set `SCGPT_PREP_ABORT_AFTER_SHARDS=N` to die like a killed process
/// (no unwinding, no cleanup) right after the N-th shard of this process is recorded.
fn crash_point_for_tests() {
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    if let Some(n) = std::env::var("SCGPT_PREP_ABORT_AFTER_SHARDS").ok().and_then(|v| v.parse::<u64>().ok()) {
        if WRITTEN.fetch_add(1, Ordering::SeqCst) + 1 >= n {
            std::process::abort();
        }
    }
}

pub fn shard_name(stem: &str, index: usize) -> String {
    format!("{stem}.{index:05}.parquet")
}

fn is_shard_name(name: &str, stem: &str) -> bool {
    name.strip_prefix(stem)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(".parquet"))
        .is_some_and(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

fn matrix_choice(cfg: &PrepConfig) -> MatrixChoice {
    if cfg.input.matrix == "x" {
        MatrixChoice::X
    } else {
        MatrixChoice::RawThenX
    }
}

fn gene_col(cfg: &PrepConfig) -> Option<&str> {
    (!cfg.input.gene_col.is_empty()).then_some(cfg.input.gene_col.as_str())
}

/// Settings that change the shard bytes; anything else (threads, block size) does not.
fn settings_hash(cfg: &PrepConfig, vocab: &GeneVocab) -> String {
    let relevant = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "tool_version": env!("CARGO_PKG_VERSION"),
        "vocab": vocab.content_hash(),
        "gene_col": cfg.input.gene_col, "matrix": cfg.input.matrix,
        "allow_non_integer": cfg.input.allow_non_integer,
        "filter": cfg.filter, "binning": cfg.binning,
        "shard_cells": cfg.output.shard_cells, "obs_cols": cfg.output.obs_cols,
        // Progress records since the counted gene filter carry how their shards were filtered.
        "gene_filter_records": 2,
    });
    hex(&Sha256::digest(relevant.to_string().as_bytes()))[..16].to_string()
}

/// Integer counts with float noise are rounded; anything else is refused unless allowed.
#[inline]
fn clean_value(v: f32, allow_non_integer: bool) -> Result<f32, &'static str> {
    if !v.is_finite() {
        return Err("is not a finite number");
    }
    if v < 0.0 {
        return Err("is negative; counts must be >= 0");
    }
    if allow_non_integer {
        return Ok(v);
    }
    let r = v.round();
    if (v - r).abs() <= 1e-3 * r.abs().max(1.0) {
        Ok(r)
    } else {
        Err("is not an integer count; if the data is normalised (e.g. log1p), pass --allow-non-integer, or point the reader at raw counts")
    }
}

fn reader_path_hint(cell_ids: &ObsNames, row: usize) -> String {
    let id = cell_ids.read(row..row + 1).ok().and_then(|ids| ids.into_iter().next());
    format!("row {row} (cell `{}`)", id.as_deref().unwrap_or("?"))
}

/// Cells read from the obs index per window, as the writer walks the rows in order.
const CELL_ID_WINDOW: usize = 16_384;

fn value_error(path: &Path, at: &str, gene: &str, v: f32, why: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: expression value {v} at {at}, gene `{gene}` {why}", path.display())
}

/// `filter.genes` as a set, when given.
fn gene_list(cfg: &PrepConfig) -> Option<std::collections::HashSet<&str>> {
    (!cfg.filter.genes.is_empty()).then(|| cfg.filter.genes.iter().map(String::as_str).collect())
}

fn check_gene_match(path: &Path, reader: &H5adReader, names: &[String], gm: &GeneMatch, cfg: &PrepConfig) -> anyhow::Result<()> {
    if gm.matched() > 0 {
        return Ok(());
    }
    let sample: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let source = if cfg.input.gene_col.is_empty() { "the var index".to_string() } else { format!("var column `{}`", cfg.input.gene_col) };
    let hint = if gm.ensembl_like * 2 > names.len() {
        "they look like Ensembl ids that are not in the shipped Ensembl table: use --gene-col feature_name (CELLxGENE) or a vocabulary of Ensembl ids"
    } else {
        "check --gene-col (CELLxGENE keeps symbols in `feature_name`), or build a vocabulary from the data with --build-vocab"
    };
    bail!(
        "{}: none of the {} genes in {source} (matrix {}) is in the vocabulary (first names: {:?}); {hint}",
        path.display(),
        names.len(),
        reader.matrix_path(),
        sample
    )
}

fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {human_pos}/{human_len} cells  {per_sec}  ETA {eta}")
            .expect("valid template"),
    );
    bar
}

#[cfg(test)]
/// Rows of `per_row` values over `n_vars` columns, cut into blocks of the given sizes.
fn blocks_of(values: &[f32], per_row: usize, n_vars: usize, block_rows: &[usize]) -> Vec<anyhow::Result<RowBlock>> {
    let rows = values.len() / per_row;
    let mut out = Vec::new();
    let mut start = 0;
    for &n in block_rows.iter().cycle() {
        if start >= rows {
            break;
        }
        let end = (start + n).min(rows);
        let (a, b) = (start * per_row, end * per_row);
        let indices: Vec<u32> = (a..b).map(|k| ((k % per_row) * 7 % n_vars) as u32).collect();
        let indptr = (0..=end - start).map(|r| r * per_row).collect();
        out.push(Ok(RowBlock { start, indptr, indices: indices.into(), data: values[a..b].to_vec().into() }));
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_cleaned_or_refused() {
        assert_eq!(clean_value(3.0000002, false), Ok(3.0));
        assert!(clean_value(2.5, false).is_err());
        assert_eq!(clean_value(2.5, true), Ok(2.5));
        assert!(clean_value(-1.0, true).is_err());
        assert!(clean_value(f32::NAN, true).is_err());
    }

    #[test]
    fn shard_names_round_trip() {
        assert!(is_shard_name(&shard_name("a.b", 3), "a.b"));
        assert!(!is_shard_name("a.b.00003.parquet", "a"));
    }
}
