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
use scgpt_data::shard::{CellLists, ShardInfo, ShardWriter};
use scgpt_data::small_int;
use scgpt_data::vocab::{hex, match_genes, EnsemblTable, GeneMatch, GeneVocab};

use crate::config::PrepConfig;
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
            atomic::write_bytes(&vocab_path, vocab_json.as_bytes())
                .with_context(|| format!("{}: cannot write", vocab_path.display()))?;
        }

        // Sizes up front for the progress bar; a file that cannot be opened counts as 0 here
        // and reports its error when processed.
        let total: u64 = inputs
            .iter()
            .map(|(p, _)| H5adReader::count_cells(p, matrix_choice(&self.cfg)).map(|n| n as u64).unwrap_or(0))
            .sum();
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
                Err(e) => return Err(e.context(format!("{}: failed; fix it, or set input.skip_bad_files = true to skip bad files", path.display()))),
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

        let mut reader = H5adReader::open(path, matrix_choice(&self.cfg))?;
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
        let obs_values: Vec<Vec<String>> =
            self.cfg.output.obs_cols.iter().map(|c| reader.obs_column(c)).collect::<Result<_, _>>()?;
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
        let file = FilePass { stem, path, n_obs, names: &names, hint: &hint, keep_cell: &keep_cell, obs_values: &obs_values, cell_ids: &cell_ids };
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
                (shards, cells_written, _) = self.bin_pass(&file, &mut reader, 0, &gene_ids, false, Vec::new(), &mut rec, None, processed)?;
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

    /// The binning pass from `start_row`: reader threads (several blocks in flight), rayon
    /// workers binning blocks, a writer thread encoding Parquet and a thread finishing full
    /// shards, after `shards`. `check_all`: also check every stored value of the file (the
    /// counted gene filter did not read them) and report whether one was below 1. Returns all
    /// shards, the cells in them, and that report.
    #[allow(clippy::too_many_arguments)]
    fn bin_pass(
        &self,
        file: &FilePass,
        reader: &mut H5adReader,
        start_row: usize,
        gene_ids: &[Option<u32>],
        check_all: bool,
        shards: Vec<ShardRecord>,
        rec: &mut FileRecord,
        bar: Option<&ProgressBar>,
        processed: &AtomicU64,
    ) -> anyhow::Result<(Vec<ShardRecord>, usize, bool)> {
        let FilePass { stem, path, n_obs, names, hint, keep_cell, obs_values, cell_ids } = *file;
        let cells_before = shards.iter().map(|s| s.info.rows).sum::<usize>();
        let block_cells = self.cfg.run.block_cells;
        let shard_cells = self.cfg.output.shard_cells;
        let gene_table = GeneTable::new(gene_ids, self.vocab.len());
        let binning = CellBinning {
            gene_ids: &gene_table,
            keep_cell,
            check_all,
            min_genes: self.cfg.filter.min_genes_per_cell,
            allow_non_integer: self.cfg.input.allow_non_integer,
            n_bins: self.cfg.binning.n_bins,
            seed: (!self.cfg.binning.deterministic).then_some(self.cfg.binning.seed),
            file_key: hash_str(stem),
            path,
            names,
            hint,
        };
        // The stages overlap: reader threads (several blocks in flight), rayon workers binning
        // a block, a writer thread encoding Parquet, and a thread finishing full shards.
        std::thread::scope(|scope| -> anyhow::Result<(Vec<ShardRecord>, usize, bool)> {
            let (block_tx, block_rx) = crossbeam_channel::bounded::<anyhow::Result<RowBlock>>(2);
            let (chunk_tx, chunk_rx) = crossbeam_channel::bounded::<Vec<BinnedChunk>>(2);
            let reader_ref = reader;
            scope.spawn(move || {
                reader_ref.stream_rows(start_row, n_obs, block_cells, BINNING_READ_AHEAD, |block| block_tx.send(block.map_err(anyhow::Error::from)).is_ok());
            });
            // Finishing a shard (its last row group, the disk thread's tail, fsync, rename) took
            // 0.1-0.8 s: on the writer thread it stalled the whole pipeline, ~10% of the run.
            let (finish_tx, finish_rx) = crossbeam_channel::bounded::<(ShardWriter, usize, bool, bool)>(1);
            let next_shard = shards.len();
            let finisher = std::thread::Builder::new().name("shard-finisher".into()).spawn_scoped(scope, move || -> anyhow::Result<(Vec<ShardRecord>, usize)> {
                let mut shards = shards;
                let mut written = cells_before;
                // Shards are made durable (and then recorded) at most every sync_every_s: each
                // sync is a device flush that stalls every read for a while.
                let sync_every = std::time::Duration::from_secs_f64(self.cfg.run.sync_every_s);
                let mut unsynced: Vec<(std::fs::File, PathBuf)> = Vec::new();
                let mut last_sync = std::time::Instant::now();
                let sync = |unsynced: &mut Vec<(std::fs::File, PathBuf)>| -> anyhow::Result<()> {
                    for (f, path) in unsynced.drain(..) {
                        f.sync_all().with_context(|| format!("{}: cannot sync shard", path.display()))?;
                    }
                    atomic::sync_dir(&self.out);
                    Ok(())
                };
                for (w, row_end, last, below_one) in finish_rx {
                    let path = w.path().to_path_buf();
                    let (info, file) = w.finish_unsynced()?;
                    written += info.rows;
                    shards.push(ShardRecord { info, row_end });
                    unsynced.push((file, path));
                    // The last shard is recorded with the finished file's record.
                    if !last {
                        if last_sync.elapsed() >= sync_every {
                            sync(&mut unsynced)?;
                            last_sync = std::time::Instant::now();
                            rec.shards = shards.clone();
                            rec.values_below_one |= below_one;
                            self.save_record(rec)?;
                        }
                        crash_point_for_tests();
                    }
                }
                // The rest (the last shard at least) is made durable before the file's record
                // names it.
                sync(&mut unsynced)?;
                Ok((shards, written))
            })?;
            let mut ids: (usize, Vec<String>) = (0, Vec::new());
            let writer = std::thread::Builder::new().name("shard-writer".into()).spawn_scoped(scope, move || -> anyhow::Result<bool> {
                let mut next_shard = next_shard;
                // Whether a value below 1 was seen in the rows up to the current one.
                let mut below_one = false;
                let mut open: Option<ShardWriter> = None;
                let mut obs_row: Vec<String> = Vec::with_capacity(obs_values.len());
                for chunks in chunk_rx {
                    for chunk in &chunks {
                        below_one |= chunk.below_one;
                        for k in 0..chunk.rows.len() {
                            let row = chunk.rows[k];
                            obs_row.clear();
                            obs_row.extend(obs_values.iter().map(|c| c[row].clone()));
                            if open.is_none() {
                                let path = self.out.join(shard_name(stem, next_shard));
                                open = Some(ShardWriter::create(&path, &self.cfg.output.obs_cols)?);
                                next_shard += 1;
                            }
                            let w = open.as_mut().expect("just opened");
                            if !(ids.0..ids.0 + ids.1.len()).contains(&row) {
                                ids = (row, cell_ids.read(row..row + CELL_ID_WINDOW)?);
                            }
                            w.push(&chunk.lists, k, chunk.n_counts[k], &ids.1[row - ids.0], stem, &obs_row)?;
                            if w.rows() == shard_cells && finish_tx.send((open.take().expect("open"), row + 1, false, below_one)).is_err() {
                                return Ok(below_one); // the finisher failed; its error is reported below
                            }
                        }
                    }
                }
                if let Some(w) = open.take() {
                    let _ = finish_tx.send((w, n_obs, true, below_one));
                }
                Ok(below_one)
            })?;
            // Several blocks are binned at once, so the cores do not idle while the last chunk of
            // a block finishes (that tail was ~10% of the binning pass).
            let binning = &binning;
            let binned = rayon::in_place_scope(|s| -> anyhow::Result<()> {
                let forward = |rx: crossbeam_channel::Receiver<(anyhow::Result<Vec<BinnedChunk>>, usize)>| -> anyhow::Result<bool> {
                    let (chunks, n) = rx.recv().expect("a binning task always answers");
                    if chunk_tx.send(chunks?).is_err() {
                        return Ok(false); // the writer failed; its error is reported below
                    }
                    if let Some(bar) = bar {
                        bar.inc(n as u64);
                    }
                    processed.fetch_add(n as u64, Ordering::Relaxed);
                    Ok(true)
                };
                let mut pending = std::collections::VecDeque::new();
                for block in block_rx {
                    let block = block?;
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    s.spawn(move |_| {
                        let chunks = (0..block.n_rows())
                            .collect::<Vec<_>>()
                            .par_chunks(CHUNK_CELLS)
                            .map_init(Binner::new, |binner, rows| binning.bin_chunk(binner, &block, rows))
                            .collect::<anyhow::Result<_>>();
                        let _ = tx.send((chunks, block.n_rows()));
                    });
                    pending.push_back(rx);
                    if pending.len() == BLOCKS_BINNING && !forward(pending.pop_front().expect("non-empty"))? {
                        return Ok(());
                    }
                }
                while let Some(rx) = pending.pop_front() {
                    if !forward(rx)? {
                        break;
                    }
                }
                Ok(())
            });
            drop(chunk_tx);
            let wrote = writer.join().map_err(|_| anyhow::anyhow!("shard writer thread panicked"))?;
            let finished = finisher.join().map_err(|_| anyhow::anyhow!("shard finisher thread panicked"))?;
            let below_one = wrote?;
            binned?;
            let (shards, written) = finished?;
            Ok((shards, written, below_one))
        })
    }

    /// Vocabulary id per input column after the per-file gene filter, and how it was decided.
    /// Counts (the default for integer input read directly): from the column indices alone,
    /// plus the values of the genes stored in fewer cells than the threshold; it leaves the
    /// values' check to the binning pass. Exact: from the totals of every value, which it also
    /// checks.
    fn gene_filter(&self, reader: &mut H5adReader, gm: &GeneMatch, names: &[String], hint: &CellHint, exact_only: bool) -> anyhow::Result<(Vec<Option<u32>>, GeneRule)> {
        if self.cfg.filter.gene_min_counts_per_10k_cells <= 0.0 {
            return Ok((gm.ids.clone(), GeneRule::Unfiltered));
        }
        // A lane records at most `threshold` entries per column: past the cap, exact totals.
        let recorded = reader.n_vars() as f64 * self.gene_threshold(reader).ceil();
        let narrow = reader.n_vars() < 1 << COLUMN_BITS && recorded <= MAX_RECORDED_PER_LANE as f64;
        if !exact_only && !self.cfg.input.allow_non_integer && narrow && reader.can_read_indices_alone() {
            if let Some(ids) = self.counted_gene_filter(reader, gm)? {
                return Ok((ids, GeneRule::Counted));
            }
        }
        Ok((self.exact_gene_filter(reader, gm, names, hint)?, GeneRule::Exact))
    }

    /// The filter's threshold for this file: the original filters on all cells of the
    /// partition, before any obs filter.
    fn gene_threshold(&self, reader: &H5adReader) -> f64 {
        self.cfg.filter.gene_min_counts_per_10k_cells / 10_000.0 * reader.n_obs() as f64
    }

    /// The exact gene filter: totals of every value; also validates them.
    fn exact_gene_filter(&self, reader: &mut H5adReader, gm: &GeneMatch, names: &[String], hint: &CellHint) -> anyhow::Result<Vec<Option<u32>>> {
        let threshold = self.gene_threshold(reader);
        let n = reader.n_obs();
        // This pass only reads and sums, so it is bound by the disk, which delivers in
        // proportion to the bytes in flight: many blocks are requested at once.
        let block_cells = self.cfg.run.block_cells;
        let path = reader.path().to_path_buf();
        let sums = GeneSums { n_vars: reader.n_vars(), failed_block: AtomicUsize::new(usize::MAX), path: &path, names, hint };
        let totals = std::thread::scope(|scope| {
            let (tx, rx) = crossbeam_channel::bounded::<Result<RowBlock, scgpt_data::h5ad::H5adError>>(1);
            scope.spawn(move || reader.stream_rows(0, n, block_cells, GENE_FILTER_READ_AHEAD, |b| tx.send(b).is_ok()));
            sums.totals(rx.into_iter().map(|b| b.map_err(anyhow::Error::from)))
        })?;
        // The binning pass holds fewer blocks at once: give the spare buffers back.
        scgpt_data::words::clear_pool();
        Ok(gm.ids.iter().zip(&totals).map(|(id, &t)| if clears(t, threshold) { *id } else { None }).collect())
    }

    /// The gene filter from the column indices (half the file's bytes): a gene stored in at
    /// least `threshold` cells totals at least that when every stored value is at least 1
    /// (integer counts; the binning pass checks it). Genes stored in fewer cells are decided
    /// by their values, read where they lie and summed as the exact filter sums them. `None`
    /// when the values cannot be read apart from their rows, or the positions overflow their
    /// record.
    fn counted_gene_filter(&self, reader: &mut H5adReader, gm: &GeneMatch) -> anyhow::Result<Option<Vec<Option<u32>>>> {
        let threshold = self.gene_threshold(reader);
        let n = reader.n_obs();
        let block_cells = self.cfg.run.block_cells;
        let counter = GeneCounts { n_vars: reader.n_vars(), threshold, gave_up: std::sync::atomic::AtomicBool::new(false) };
        let counted = std::thread::scope(|scope| {
            let (tx, rx) = crossbeam_channel::bounded::<Result<RowBlock, scgpt_data::h5ad::H5adError>>(1);
            let reader = &mut *reader;
            scope.spawn(move || reader.stream_row_indices(0, n, block_cells, GENE_FILTER_READ_AHEAD, |b| tx.send(b).is_ok()));
            counter.count(rx.into_iter().map(|b| b.map_err(anyhow::Error::from)))
        })?;
        scgpt_data::words::clear_pool();
        let Some((counts, mut few)) = counted else { return Ok(None) };
        // Genes in the vocabulary stored in fewer cells than the threshold: their values decide.
        let undecided = |c: usize| gm.ids[c].is_some() && counts[c] > 0 && (counts[c] as f64) < threshold;
        let column = |e: u64| (e & ((1 << COLUMN_BITS) - 1)) as usize;
        let position = |e: u64| (e >> COLUMN_BITS) as usize;
        few.retain(|&e| undecided(column(e)));
        few.sort_unstable();
        let positions: Vec<usize> = few.iter().map(|&e| position(e)).collect();
        let values = match reader.values_at(&positions) {
            Some(v) => v?,
            None => return Ok(None),
        };
        // Per lane in file order, the lanes then added in order: the exact filter's sums, bit
        // for bit, whatever the values.
        let mut lanes = vec![vec![0f64; reader.n_vars()]; SUM_LANES];
        for (&e, &v) in few.iter().zip(&values) {
            lanes[lane_of(position(e))][column(e)] += v as f64;
        }
        let mut totals = vec![0f64; reader.n_vars()];
        for lane in &lanes {
            totals.iter_mut().zip(lane).for_each(|(a, b)| *a += b);
        }
        Ok(Some(
            gm.ids
                .iter()
                .enumerate()
                .map(|(c, id)| {
                    let kept = if undecided(c) { clears(totals[c], threshold) } else { counts[c] > 0 };
                    if kept { *id } else { None }
                })
                .collect(),
        ))
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

/// An f32 is finite and not negative exactly when this key is below [`POSITIVE_INFINITY_BITS`]:
/// its bits, with -0.0 (which is not negative) read as 0.0. Negatives have the sign bit set and
/// NaN and infinity an all-ones exponent, so one vectorised `max` checks a whole block.
fn nonnegative_finite_key(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits == 0x8000_0000 {
        0
    } else {
        bits
    }
}
const POSITIVE_INFINITY_BITS: u32 = 0x7f80_0000;

/// Vocabulary id per input column, [`GeneId::NONE`] for dropped genes, in 16 bits when the
/// vocabulary allows: looked up for every value, and the whole-human vocabulary's 60,697 ids
/// as u32 (240 KB at CELLxGENE's 60k columns) missed the first-level cache twice as often.
enum GeneTable {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

impl GeneTable {
    fn new(ids: &[Option<u32>], vocab_len: usize) -> Self {
        // One padding entry past the columns: a 32-bit gather of the last 16-bit entry reads it.
        if vocab_len < u16::NONE as usize {
            GeneTable::Narrow(ids.iter().map(|g| g.map_or(u16::NONE, |id| id as u16)).chain([u16::NONE]).collect())
        } else {
            GeneTable::Wide(ids.iter().map(|g| g.unwrap_or(u32::NONE)).chain([u32::NONE]).collect())
        }
    }
}

trait GeneId: Copy + Eq {
    /// Marks an input gene that is not in the vocabulary or was filtered out.
    const NONE: Self;
    /// Bytes per entry, the scale of a 32-bit gather from the table.
    const BYTES: usize;
    fn id(self) -> i32;
}

impl GeneId for u16 {
    const NONE: u16 = u16::MAX;
    const BYTES: usize = 2;
    fn id(self) -> i32 {
        self as i32
    }
}

impl GeneId for u32 {
    const NONE: u32 = u32::MAX;
    const BYTES: usize = 4;
    fn id(self) -> i32 {
        self as i32
    }
}

/// What copying a row's kept entries learnt of its values on the way, so no later pass reads
/// them again to check or total them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RowScan {
    /// Entries kept (a gene in the table, a nonzero value), written at the front of the outputs.
    kept: usize,
    /// Every stored value is an integer in `0..2^23` ([`small_int::LIMIT`]); the kept ones are
    /// then integers in `1..2^23`, and `max` and `sum` are theirs.
    integer: bool,
    /// Every stored value is at least 1.
    at_least_one: bool,
    max: u32,
    sum: u64,
}

impl RowScan {
    /// Folds stored values `vals` in, of which `kept` were kept.
    fn add(mut self, vals: &[f32], kept: &[f32]) -> Self {
        // No early exits, so the folds vectorise.
        self.integer &= vals.iter().fold(true, |ok, &v| ok & small_int::is_int_in(v, 0.0, small_int::LIMIT));
        self.at_least_one &= vals.iter().fold(true, |ok, &v| ok & (v >= 1.0));
        self.max = kept.iter().fold(self.max, |m, &v| m.max(small_int::value(v)));
        self.sum += kept.iter().map(|&v| small_int::value(v) as u64).sum::<u64>();
        self.kept += kept.len();
        self
    }
}

const EMPTY_SCAN: RowScan = RowScan { kept: 0, integer: true, at_least_one: true, max: 0, sum: 0 };

/// Copies the kept entries of a row (a gene in the table, a nonzero value) to the front of
/// `genes` (vocabulary ids) and `values`, each with room for every entry, and scans its values.
/// Every column index is below `table.len() - 1` (the reader checked them against the gene
/// count; the table has one entry of padding).
fn compact_row<G: GeneId>(table: &[G], cols: &[u32], vals: &[f32], genes: &mut [std::mem::MaybeUninit<i32>], values: &mut [std::mem::MaybeUninit<f32>]) -> RowScan {
    assert!(genes.len() >= cols.len() && values.len() >= cols.len() && vals.len() == cols.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature is present; the bounds are as the function's contract and the
        // assert above say.
        return unsafe { compact_row_avx512(table, cols, vals, genes.as_mut_ptr().cast(), values.as_mut_ptr().cast()) };
    }
    compact_row_scalar(table, cols, vals, genes, values, 0, EMPTY_SCAN)
}

/// [`compact_row`] from entry `i` on, with `scan` of the entries before it. Branch-free: each
/// entry is written, and the slot moves on only if it is kept.
fn compact_row_scalar<G: GeneId>(
    table: &[G],
    cols: &[u32],
    vals: &[f32],
    genes: &mut [std::mem::MaybeUninit<i32>],
    values: &mut [std::mem::MaybeUninit<f32>],
    i: usize,
    scan: RowScan,
) -> RowScan {
    let first = scan.kept;
    let mut k = first;
    for (&c, &v) in cols[i..].iter().zip(&vals[i..]) {
        let id = table[c as usize];
        genes[k].write(id.id());
        values[k].write(v);
        k += (id != G::NONE && v != 0.0) as usize;
    }
    // SAFETY: slots first..k were written above.
    let kept = unsafe { std::slice::from_raw_parts(values[first..k].as_ptr().cast::<f32>(), k - first) };
    scan.add(&vals[i..], kept)
}

/// [`compact_row`] sixteen entries at a time: a gather from the table, two compares and two
/// compressions into a register (a compressing store to memory is microcoded on AMD's cores),
/// stored whole, the slot moving on by the kept count; the checks, largest and total of the
/// values on the registers already loaded. The scalar loop took 15% of a run's CPU (two bounds
/// checks and a dependent table load per value), the separate folds over the values 8%.
///
/// # Safety
/// AVX-512F is available; `genes` and `values` have room for `cols.len()` entries; every
/// column index is below `table.len() - 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn compact_row_avx512<G: GeneId>(table: &[G], cols: &[u32], vals: &[f32], genes: *mut i32, values: *mut f32) -> RowScan {
    use std::arch::x86_64::*;
    let n = cols.len();
    let base = table.as_ptr() as *const i32;
    // A 16-bit entry is gathered as the 32 bits at its address (the padding entry keeps the
    // last one in bounds), then masked.
    let (none, mask) = match G::BYTES {
        2 => (_mm512_set1_epi32(u16::MAX as i32), _mm512_set1_epi32(0xFFFF)),
        _ => (_mm512_set1_epi32(-1), _mm512_set1_epi32(-1)),
    };
    let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
    let (mut max, mut sum_lo, mut sum_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
    let (mut not_integer, mut below_one): (__mmask16, __mmask16) = (0, 0);
    let (mut i, mut k) = (0, 0);
    while i + 16 <= n {
        // SAFETY: i + 16 <= n for the loads; the gathered addresses are table entries (plus
        // two bytes of the padding entry); k <= i, so the 16 stores end by slot n.
        unsafe {
            let idx = _mm512_loadu_si512(cols.as_ptr().add(i).cast());
            let raw = if G::BYTES == 2 { _mm512_i32gather_epi32::<2>(idx, base) } else { _mm512_i32gather_epi32::<4>(idx, base) };
            let ids = _mm512_and_si512(raw, mask);
            let v = _mm512_loadu_ps(vals.as_ptr().add(i));
            let keep = _mm512_cmpneq_epi32_mask(ids, none) & _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, zero);
            _mm512_storeu_si512(genes.add(k).cast(), _mm512_maskz_compress_epi32(keep, ids));
            _mm512_storeu_ps(values.add(k), _mm512_maskz_compress_ps(keep, v));
            k += keep.count_ones() as usize;
            let shifted = small_int::lanes::shifted(v);
            not_integer |= !small_int::lanes::is_int_in(v, shifted, 0.0, small_int::LIMIT);
            below_one |= !_mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, one);
            let x = _mm512_maskz_mov_epi32(keep, small_int::lanes::value(shifted));
            max = _mm512_max_epu32(max, x);
            sum_lo = _mm512_add_epi64(sum_lo, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(x)));
            sum_hi = _mm512_add_epi64(sum_hi, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(x)));
        }
        i += 16;
    }
    let scan = RowScan {
        kept: k,
        integer: not_integer == 0,
        at_least_one: below_one == 0,
        max: _mm512_reduce_max_epu32(max),
        sum: _mm512_reduce_add_epi64(_mm512_add_epi64(sum_lo, sum_hi)) as u64,
    };
    // SAFETY: the caller's slices, rebuilt from their pointers and length.
    let (genes, values) = unsafe { (std::slice::from_raw_parts_mut(genes.cast(), n), std::slice::from_raw_parts_mut(values.cast(), n)) };
    compact_row_scalar(table, cols, vals, genes, values, i, scan)
}

/// Bytes requested at once by the gene-filter pass, which only sums, so the disk bounds it.
const GENE_FILTER_READ_AHEAD: usize = 256 << 20;
/// Bytes requested at once by the binning pass, bound by the cores: enough to keep them fed,
/// few enough that the shard writes are not queued behind a long line of reads.
const BINNING_READ_AHEAD: usize = 48 << 20;

/// Row blocks being binned at once. Three rather than two: idle + iowait fell and the 250k-cell
/// file ran 7.6 s against 8.4 s (mean of four interleaved runs each), for ~40 MB more.
const BLOCKS_BINNING: usize = 3;

/// Threads summing gene totals. A fixed number, not one per core: summing one value is a
/// nanosecond, so two lanes outrun any disk, and a fixed split keeps float totals (non-integer
/// input) the same on every machine.
const SUM_LANES: usize = 2;

/// Values in one piece of the gene-filter pass: piece k of the file (counted over all its
/// values, whatever the blocks) is summed by lane k mod [`SUM_LANES`].
const SUM_PIECE: usize = 1 << 16;

/// The lane that sums the value at file position `at`.
fn lane_of(at: usize) -> usize {
    (at / SUM_PIECE) % SUM_LANES
}

/// Ranges (within the block) of `lane`'s pieces of a block whose `len` values start at file
/// position `first_value`.
fn lane_pieces(lane: usize, first_value: usize, len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let end = first_value + len;
    let first = first_value / SUM_PIECE;
    let first = first + (lane + SUM_LANES - first % SUM_LANES) % SUM_LANES;
    (first..).step_by(SUM_LANES).take_while(move |p| p * SUM_PIECE < end).map(move |p| {
        (p * SUM_PIECE).max(first_value) - first_value..((p + 1) * SUM_PIECE).min(end) - first_value
    })
}

/// Hands each block of a file, in order, to every lane with the file position of its first
/// value (`len` values), until `stop` says so; returns a read error that ended the pass.
fn feed_lanes<M>(
    blocks: impl Iterator<Item = anyhow::Result<RowBlock>>,
    to_lanes: Vec<crossbeam_channel::Sender<M>>,
    len: impl Fn(&RowBlock) -> usize,
    stop: impl Fn(usize) -> bool,
    message: impl Fn(usize, usize, &Arc<RowBlock>) -> M,
) -> Option<anyhow::Error> {
    let mut first_value = 0;
    for (index, b) in blocks.enumerate() {
        if stop(index) {
            break;
        }
        let b = match b {
            Ok(b) => Arc::new(b),
            Err(e) => return Some(e),
        };
        for tx in &to_lanes {
            let _ = tx.send(message(index, first_value, &b));
        }
        first_value += len(&b);
    }
    None
}

/// The gene-filter pass: totals per input column, summed by lanes that each keep one table
/// (hot in their core's cache) over the whole file, and the check of every value.
struct GeneSums<'a> {
    n_vars: usize,
    /// The first block in which a lane found a bad value; later blocks need not be read.
    failed_block: AtomicUsize,
    path: &'a Path,
    names: &'a [String],
    hint: &'a CellHint<'a>,
}

/// Names a source row in an error message: its index and cell id.
type CellHint<'a> = dyn Fn(usize) -> String + Sync + 'a;

/// A bad value: its block, its position in the block's values, and the error naming it.
type BadValue = (usize, usize, anyhow::Error);

impl GeneSums<'_> {
    /// Totals per input column over `blocks` (a file's rows in order), or the first bad value
    /// in file order.
    fn totals(&self, blocks: impl Iterator<Item = anyhow::Result<RowBlock>>) -> anyhow::Result<Vec<f64>> {
        std::thread::scope(|scope| {
            let mut to_lanes = Vec::new();
            let mut lanes = Vec::new();
            for lane in 0..SUM_LANES {
                let (tx, rx) = crossbeam_channel::bounded::<(usize, usize, Arc<RowBlock>)>(2);
                to_lanes.push(tx);
                lanes.push(std::thread::Builder::new().name(format!("gene-sum-{lane}")).spawn_scoped(scope, move || self.lane(lane, rx))?);
            }
            // A bad value found in an earlier block ends the pass.
            let stop = |index: usize| index > self.failed_block.load(Ordering::Relaxed);
            let read_error = feed_lanes(blocks, to_lanes, |b| b.data.len(), stop, |index, first, b| (index, first, b.clone()));
            let mut totals = vec![0f64; self.n_vars];
            let mut first_bad: Option<BadValue> = None;
            // Lanes are added in a fixed order, so the totals are the same on every run.
            for lane in lanes {
                match lane.join().map_err(|_| anyhow::anyhow!("gene-sum thread panicked"))? {
                    Ok(t) => totals.iter_mut().zip(&t).for_each(|(a, b)| *a += b),
                    Err(e) if first_bad.as_ref().is_none_or(|f| (e.0, e.1) < (f.0, f.1)) => first_bad = Some(e),
                    Err(_) => {}
                }
            }
            // A bad value comes before a read error in a later block.
            match (first_bad, read_error) {
                (Some((_, _, e)), _) | (None, Some(e)) => Err(e),
                (None, None) => Ok(totals),
            }
        })
    }

    /// Sums this lane's pieces of every block (block index, file position of its first value,
    /// block) until the channel closes, or until the first bad value in its pieces.
    fn lane(&self, lane: usize, blocks: crossbeam_channel::Receiver<(usize, usize, Arc<RowBlock>)>) -> Result<Vec<f64>, BadValue> {
        let mut totals = vec![0f64; self.n_vars];
        for (index, first_value, b) in blocks {
            if index > self.failed_block.load(Ordering::Relaxed) {
                continue; // drain: a bad value in an earlier block ends the pass
            }
            for range in lane_pieces(lane, first_value, b.data.len()) {
                let (cols, vals) = (&b.indices[range.clone()], &b.data[range.clone()]);
                // A slice, not the Vec: through the Vec its data pointer was reloaded per value.
                // (Indices were checked against n_vars by the reader.)
                let t = totals.as_mut_slice();
                for (&c, &v) in cols.iter().zip(vals) {
                    t[c as usize] += v as f64;
                }
                // Bad values are refused here even in genes the filter drops: one branch-free
                // check per piece; only a piece with a bad value is walked to name it.
                if vals.iter().map(|v| nonnegative_finite_key(*v)).max().unwrap_or(0) >= POSITIVE_INFINITY_BITS {
                    let at = range.start + vals.iter().position(|v| !(*v >= 0.0 && v.is_finite())).expect("a bad value");
                    self.failed_block.fetch_min(index, Ordering::Relaxed);
                    return Err((index, at, self.bad_value(&b, at)));
                }
            }
        }
        Ok(totals)
    }

    fn bad_value(&self, b: &RowBlock, at: usize) -> anyhow::Error {
        let row = b.start + b.indptr.partition_point(|&p| p <= at) - 1;
        let (c, v) = (b.indices[at] as usize, b.data[at]);
        let why = clean_value(v, true).expect_err("non-finite or negative");
        value_error(self.path, &(self.hint)(row), &self.names[c], v, why)
    }
}

/// The per-file gene filter's rule: a gene is kept when its total reaches the threshold (and
/// is not zero, for a threshold of 0).
fn clears(total: f64, threshold: f64) -> bool {
    total >= threshold && total > 0.0
}

/// How a file's gene filter was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GeneRule {
    /// From exact totals of every value (which were checked on the way).
    Exact,
    /// From the number of cells storing each gene: every stored value must be checked by the
    /// binning pass, and one below 1 sends the file to the exact filter.
    Counted,
    /// No gene filter (only the vocabulary's).
    Unfiltered,
}

/// Per lane, at most this many recorded entries of genes still under the threshold (8 bytes
/// each, 64 MB). They come from each column's first `threshold` stored cells, so at most
/// columns x threshold (20k genes at 1M cells: 6M; the census's 60k genes in the original's
/// 200k-cell partitions: 3.6M); a file whose bound is past it takes the exact filter.
const MAX_RECORDED_PER_LANE: usize = 1 << 23;

/// A recorded entry: its position in the file's values above [`COLUMN_BITS`] bits of column,
/// so that entries sort by position.
const COLUMN_BITS: u32 = 24;

/// The counted gene filter's pass: per column, the cells that store it, and where the stored
/// entries of columns still under the threshold lie, from blocks of column indices.
struct GeneCounts {
    n_vars: usize,
    threshold: f64,
    gave_up: std::sync::atomic::AtomicBool,
}

/// Counts per column, and the recorded entries of the columns under the threshold.
type Counted = (Vec<u64>, Vec<u64>);

impl GeneCounts {
    /// `None` when a lane recorded more pairs than [`MAX_RECORDED_PER_LANE`].
    fn count(&self, blocks: impl Iterator<Item = anyhow::Result<RowBlock>>) -> anyhow::Result<Option<Counted>> {
        std::thread::scope(|scope| {
            let mut to_lanes = Vec::new();
            let mut lanes = Vec::new();
            for lane in 0..SUM_LANES {
                let (tx, rx) = crossbeam_channel::bounded::<(usize, Arc<RowBlock>)>(2);
                to_lanes.push(tx);
                lanes.push(std::thread::Builder::new().name(format!("gene-count-{lane}")).spawn_scoped(scope, move || self.lane(lane, rx))?);
            }
            let stop = |_| self.gave_up.load(Ordering::Relaxed);
            let read_error = feed_lanes(blocks, to_lanes, |b| b.indices.len(), stop, |_, first, b| (first, b.clone()));
            let mut counts = vec![0u64; self.n_vars];
            let mut recorded = Vec::new();
            for lane in lanes {
                let (c, r) = lane.join().map_err(|_| anyhow::anyhow!("gene-count thread panicked"))?;
                counts.iter_mut().zip(&c).for_each(|(a, &b)| *a += b as u64);
                recorded.extend(r);
            }
            if let Some(e) = read_error {
                return Err(e);
            }
            Ok((!self.gave_up.load(Ordering::Relaxed)).then_some((counts, recorded)))
        })
    }

    /// Counts this lane's pieces of every block (the same pieces as [`GeneSums::lane`]) and
    /// records the positions of entries whose column this lane has counted fewer than
    /// `threshold` times: every entry of a column stored in fewer cells in all.
    fn lane(&self, lane: usize, blocks: crossbeam_channel::Receiver<(usize, Arc<RowBlock>)>) -> (Vec<u32>, Vec<u64>) {
        let mut counts = vec![0u32; self.n_vars];
        let mut recorded = Vec::new();
        // An integer count is below the threshold exactly when it is below its ceiling.
        let below = self.threshold.ceil().min(u32::MAX as f64) as u32;
        for (first_value, b) in blocks {
            if self.gave_up.load(Ordering::Relaxed) {
                continue;
            }
            let end = first_value + b.indices.len();
            for range in lane_pieces(lane, first_value, b.indices.len()) {
                let t = counts.as_mut_slice();
                // (Indices were checked against n_vars by the reader.)
                for (k, &c) in b.indices[range.clone()].iter().enumerate() {
                    let n = &mut t[c as usize];
                    if *n < below {
                        recorded.push(((first_value + range.start + k) as u64) << COLUMN_BITS | c as u64);
                    }
                    *n += 1;
                }
            }
            if recorded.len() > MAX_RECORDED_PER_LANE || (end as u64) >> (64 - COLUMN_BITS) != 0 {
                self.gave_up.store(true, Ordering::Relaxed);
            }
        }
        (counts, recorded)
    }
}

/// What the binning pass needs of the file it bins.
#[derive(Clone, Copy)]
struct FilePass<'a> {
    stem: &'a str,
    path: &'a Path,
    n_obs: usize,
    names: &'a [String],
    hint: &'a CellHint<'a>,
    keep_cell: &'a [bool],
    obs_values: &'a [Vec<String>],
    cell_ids: &'a ObsNames,
}

/// Cells handed to one rayon task: enough to amortise scheduling, small enough to balance.
/// 256 cells (~512k values) rather than 128: a 2^18-value page then spans two chunks about
/// half the time instead of always, so fewer pages are gathered (-3% CPU, four A/B runs).
const CHUNK_CELLS: usize = 256;

/// Kept cells of a chunk of rows: their lists (shared with the shard writer until their row
/// group is encoded), source rows and totals.
struct BinnedChunk {
    rows: Vec<usize>,
    lists: Arc<CellLists>,
    n_counts: Vec<f32>,
    /// A stored value of the chunk's rows is below 1 (checked with `check_all` only).
    below_one: bool,
}

/// Everything a worker needs to turn raw rows into binned cells.
struct CellBinning<'a> {
    gene_ids: &'a GeneTable,
    keep_cell: &'a [bool],
    /// Check every stored value, in rows the obs filter drops and genes the binning skips too
    /// (no earlier pass read them), and report values below 1.
    check_all: bool,
    min_genes: usize,
    allow_non_integer: bool,
    n_bins: usize,
    /// `None` = deterministic (lowest tied bin).
    seed: Option<u64>,
    file_key: u64,
    path: &'a Path,
    names: &'a [String],
    hint: &'a CellHint<'a>,
}

impl CellBinning<'_> {
    fn bin_chunk(&self, binner: &mut Binner, block: &RowBlock, rows: &[usize]) -> anyhow::Result<BinnedChunk> {
        match self.gene_ids {
            GeneTable::Narrow(t) => self.bin_chunk_with(t, binner, block, rows),
            GeneTable::Wide(t) => self.bin_chunk_with(t, binner, block, rows),
        }
    }

    fn bin_chunk_with<G: GeneId>(&self, gene_ids: &[G], binner: &mut Binner, block: &RowBlock, rows: &[usize]) -> anyhow::Result<BinnedChunk> {
        let mut out = CellLists { offsets: vec![0], ..Default::default() };
        let (mut kept_rows, mut n_counts) = (Vec::new(), Vec::new());
        if let (Some(&first), Some(&last)) = (rows.first(), rows.last()) {
            let values = block.indptr[last + 1] - block.indptr[first];
            out.genes.reserve(values);
            out.expressions.reserve(values);
            out.bins.reserve(values);
        }
        let mut below_one = false;
        for &i in rows {
            let row = block.start + i;
            if !self.keep_cell[row] {
                if self.check_all {
                    let (cols, vals) = block.row(i);
                    self.check_values(row, cols, vals)?;
                    below_one |= vals.iter().fold(f32::INFINITY, |m, &v| m.min(v)) < 1.0;
                }
                continue;
            }
            let start = out.genes.len();
            let (cols, vals) = block.row(i);
            // Copied into spare capacity (zero-filling first, resize, was 2% of the run) and
            // kept there if every value is an exact integer count (the common case); anything
            // else is checked value by value and rounded or refused, the copy discarded (a
            // small cost beside the sort that binning such values takes).
            out.genes.reserve(cols.len());
            out.expressions.reserve(cols.len());
            let (genes, values) = (&mut out.genes.spare_capacity_mut()[..cols.len()], &mut out.expressions.spare_capacity_mut()[..cols.len()]);
            let scan = compact_row(gene_ids, cols, vals, genes, values);
            below_one |= !scan.at_least_one;
            if scan.integer {
                // SAFETY: slots start..start + kept were written by compact_row (kept <= cols.len()).
                unsafe {
                    out.genes.set_len(start + scan.kept);
                    out.expressions.set_len(start + scan.kept);
                }
            } else {
                if self.check_all {
                    self.check_values(row, cols, vals)?;
                }
                for (&c, &v) in cols.iter().zip(vals) {
                    let id = gene_ids[c as usize];
                    if id == G::NONE {
                        continue;
                    }
                    let v = clean_value(v, self.allow_non_integer).map_err(|why| {
                        value_error(self.path, &(self.hint)(row), &self.names[c as usize], v, why)
                    })?;
                    if v != 0.0 {
                        out.genes.push(id.id());
                        out.expressions.push(v);
                    }
                }
            }
            let n = out.genes.len() - start;
            if n == 0 || n < self.min_genes {
                out.genes.truncate(start);
                out.expressions.truncate(start);
                continue;
            }
            let values = &out.expressions[start..];
            let mut rng;
            let ties = match self.seed {
                None => TieBreak::Lowest,
                Some(seed) => {
                    rng = SplitMix64::for_item(seed, self.file_key, row as u64);
                    TieBreak::Random(&mut rng)
                }
            };
            if scan.integer && scan.max < SMALL_INT_LIMIT {
                // SAFETY: integer values without the zeros are integers in 1..=scan.max.
                unsafe { binner.append_small_int_bins(values, scan.max, self.n_bins, ties, &mut out.bins) };
            } else {
                binner.append_nonzero_bins(values, self.n_bins, ties, &mut out.bins);
            }
            // Integer counts: an exact integer sum, with no chain of dependent float adds.
            n_counts.push(if scan.integer { scan.sum as f32 } else { values.iter().map(|&v| v as f64).sum::<f64>() as f32 });
            kept_rows.push(row);
            out.offsets.push(out.genes.len());
        }
        Ok(BinnedChunk { rows: kept_rows, lists: Arc::new(out), n_counts, below_one: below_one && self.check_all })
    }

    /// Refuses a row's first negative or non-finite value, whatever its gene.
    fn check_values(&self, row: usize, cols: &[u32], vals: &[f32]) -> anyhow::Result<()> {
        if vals.iter().map(|v| nonnegative_finite_key(*v)).max().unwrap_or(0) < POSITIVE_INFINITY_BITS {
            return Ok(());
        }
        let k = vals.iter().position(|v| !(*v >= 0.0 && v.is_finite())).expect("a bad value");
        let why = clean_value(vals[k], true).expect_err("non-finite or negative");
        Err(value_error(self.path, &(self.hint)(row), &self.names[cols[k] as usize], vals[k], why))
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
    fn the_block_value_key_agrees_with_float_comparison() {
        let specials = [0.0f32, -0.0, 1.0, 3.5, f32::MAX, f32::MIN_POSITIVE, 1e-45, -1e-45, -1.0, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN];
        let ramp = (0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        for v in specials.into_iter().chain(ramp) {
            let ok = v >= 0.0 && v.is_finite();
            assert_eq!(nonnegative_finite_key(v) < POSITIVE_INFINITY_BITS, ok, "{v:e} ({:#x})", v.to_bits());
        }
    }

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

    #[test]
    fn gene_sums_are_exact_independent_of_blocks_and_name_the_first_bad_value() {
        let (per_row, n_vars) = (100, 53);
        let names: Vec<String> = (0..n_vars).map(|g| format!("g{g}")).collect();
        let hint = |row: usize| format!("row {row} (cell `c{row}`)");
        let path = Path::new("x.h5ad");
        let sums = || GeneSums { n_vars, failed_block: AtomicUsize::new(usize::MAX), path, names: &names, hint: &hint };
        // 300,000 values: pieces of both lanes in every block layout below.
        let counts: Vec<f32> = (0..300_000u32).map(|k| (k.wrapping_mul(2_654_435_761) >> 28) as f32).collect();
        let mut naive = vec![0f64; n_vars];
        for (k, &v) in counts.iter().enumerate() {
            naive[(k % per_row) * 7 % n_vars] += v as f64;
        }
        for layout in [&[3000][..], &[1, 999, 7, 650], &[1000, 0, 1000]] {
            let blocks = blocks_of(&counts, per_row, n_vars, layout).into_iter();
            assert_eq!(sums().totals(blocks).unwrap(), naive, "integer counts sum exactly, layout {layout:?}");
        }
        // Float values: the lanes' order does not follow the blocks, so totals agree to the bit.
        let floats: Vec<f32> = counts.iter().map(|v| v * 0.37 + 1e-3).collect();
        let a = sums().totals(blocks_of(&floats, per_row, n_vars, &[3000]).into_iter()).unwrap();
        let b = sums().totals(blocks_of(&floats, per_row, n_vars, &[13, 1000, 1]).into_iter()).unwrap();
        assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        // A NaN in lane 1's piece (value 70,000: row 700) comes before a negative value in lane
        // 0's (value 150,000): the NaN is reported, whichever lane finishes first.
        let mut bad = counts.clone();
        bad[70_000] = f32::NAN;
        bad[150_000] = -2.0;
        for layout in [&[3000][..], &[500], &[1]] {
            let e = sums().totals(blocks_of(&bad, per_row, n_vars, layout).into_iter()).unwrap_err().to_string();
            assert!(e.contains("x.h5ad") && e.contains("row 700 (cell `c700`)") && e.contains("not a finite number"), "{layout:?}: {e}");
        }
        bad[70_000] = 1.0;
        let e = sums().totals(blocks_of(&bad, per_row, n_vars, &[500]).into_iter()).unwrap_err().to_string();
        assert!(e.contains("row 1500 (cell `c1500`)") && e.contains("negative"), "{e}");
    }

    #[test]
    fn narrow_and_wide_gene_tables_bin_alike() {
        let (per_row, n_vars) = (40, 53);
        // Integer counts (the exact path) and one non-integer row (the checked path), with
        // explicit zeros and genes outside the vocabulary.
        let mut values: Vec<f32> = (0..400u32).map(|k| (k.wrapping_mul(2_654_435_761) >> 29) as f32).collect();
        values[200..240].iter_mut().for_each(|v| *v += 0.000_1);
        let block = blocks_of(&values, per_row, n_vars, &[10]).pop().unwrap().unwrap();
        let ids: Vec<Option<u32>> = (0..n_vars as u32).map(|g| (g % 5 != 0).then_some(g * 1000)).collect();
        let (narrow, wide) = (GeneTable::new(&ids, 60_697), GeneTable::new(&ids, 70_000));
        assert!(matches!(narrow, GeneTable::Narrow(_)) && matches!(wide, GeneTable::Wide(_)));
        let keep = vec![true; 10];
        let hint = |row: usize| format!("row {row}");
        let binning = |gene_ids| CellBinning {
            gene_ids,
            keep_cell: &keep,
            check_all: true,
            min_genes: 1,
            allow_non_integer: false,
            n_bins: 51,
            seed: Some(7),
            file_key: 1,
            path: Path::new("x.h5ad"),
            names: &[],
            hint: &hint,
        };
        let rows: Vec<usize> = (0..10).collect();
        let a = binning(&narrow).bin_chunk(&mut Binner::new(), &block, &rows).unwrap();
        let b = binning(&wide).bin_chunk(&mut Binner::new(), &block, &rows).unwrap();
        assert_eq!((&a.rows, &a.n_counts, &*a.lists), (&b.rows, &b.n_counts, &*b.lists));
        assert!(a.below_one && b.below_one, "explicit zeros are reported");
        assert!(a.lists.genes.iter().all(|g| g % 1000 == 0 && (g / 1000) % 5 != 0), "dropped genes are left out");
        assert!(a.lists.genes.iter().any(|&g| g == 52_000), "the vocabulary's ids, not the columns'");
    }

    #[test]
    fn gene_counts_are_exact_and_record_every_entry_of_rare_columns() {
        // 2^18 entries (four sum pieces, so both lanes count), 64 per row, blocks of uneven
        // sizes; columns 0..200 common, 200..300 rare (every 1000th entry).
        let (n_vars, per_row, n) = (300usize, 64usize, 1usize << 18);
        let col = |k: usize| if k % 1000 == 0 { 200 + (k / 1000) % 100 } else { (k * 7) % 200 } as u32;
        let mut blocks = Vec::new();
        let (mut row, mut k) = (0, 0);
        for &rows in [3usize, 50, 7].iter().cycle() {
            if k >= n {
                break;
            }
            let end = (k + rows * per_row).min(n);
            let indices: Vec<u32> = (k..end).map(col).collect();
            let indptr = (0..=(end - k) / per_row).map(|r| r * per_row).collect();
            blocks.push(Ok(RowBlock { start: row, indptr, indices: indices.into(), data: Vec::<f32>::new().into() }));
            row += (end - k) / per_row;
            k = end;
        }
        let threshold = 5.0;
        let counter = GeneCounts { n_vars, threshold, gave_up: std::sync::atomic::AtomicBool::new(false) };
        let (counts, recorded) = counter.count(blocks.into_iter()).unwrap().expect("well under the cap");
        let mut naive = vec![0u64; n_vars];
        (0..n).for_each(|k| naive[col(k) as usize] += 1);
        assert_eq!(counts, naive);
        let rare = |c: usize| (naive[c] as f64) < threshold;
        assert!((0..n_vars).any(rare) && (0..n_vars).any(|c| !rare(c)));
        let mut got: Vec<u64> = recorded.into_iter().filter(|&e| rare((e & ((1 << COLUMN_BITS) - 1)) as usize)).collect();
        got.sort_unstable();
        let want: Vec<u64> = (0..n).filter(|&k| rare(col(k) as usize)).map(|k| (k as u64) << COLUMN_BITS | col(k) as u64).collect();
        assert_eq!(got, want, "every entry of a column stored fewer than threshold times, at its position");
    }

    #[test]
    fn vector_compaction_keeps_and_scans_what_the_scalar_loop_does() {
        let n_vars = 1000;
        let ids: Vec<Option<u32>> = (0..n_vars as u32).map(|g| (g % 7 != 3).then_some(g * 60)).collect();
        let (narrow, wide) = (GeneTable::new(&ids, 60_697), GeneTable::new(&ids, 70_000));
        fn run<G: GeneId>(table: &[G], cols: &[u32], vals: &[f32], vector: bool) -> (Vec<i32>, Vec<f32>, RowScan) {
            let (mut g, mut v) = (Vec::<i32>::with_capacity(cols.len()), Vec::<f32>::with_capacity(cols.len()));
            let (gs, vs) = (&mut g.spare_capacity_mut()[..cols.len()], &mut v.spare_capacity_mut()[..cols.len()]);
            let scan = if vector { compact_row(table, cols, vals, gs, vs) } else { compact_row_scalar(table, cols, vals, gs, vs, 0, EMPTY_SCAN) };
            // SAFETY: both write the first `kept` slots.
            unsafe {
                g.set_len(scan.kept);
                v.set_len(scan.kept);
            }
            (g, v, scan)
        }
        let mut x = 12345u64;
        // Values of every kind a row may hold, in rows of plain counts with one odd value, and
        // rows drawn from all of them.
        let odd = [0.0f32, -0.0, 0.5, 1.5, -1.0, f32::NAN, f32::INFINITY, 8_388_607.0, 8_388_608.0, 4095.0, 4096.0, 1e-30];
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 2049] {
            for mix in 0..=odd.len() + 1 {
                let mut next = || {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (x >> 33) as u32
                };
                // The last column included, to reach the padding entry.
                let cols: Vec<u32> = (0..n).map(|i| if i % 5 == 0 { n_vars as u32 - 1 } else { next() % n_vars as u32 }).collect();
                let mut vals: Vec<f32> = (0..n).map(|_| (next() % 4) as f32).collect();
                if mix < odd.len() && n > 0 {
                    let at = next() as usize % n;
                    vals[at] = odd[mix];
                } else if mix == odd.len() {
                    vals.iter_mut().for_each(|v| *v = odd[next() as usize % odd.len()]);
                }
                for vector in [true, false] {
                    let GeneTable::Narrow(t) = &narrow else { unreachable!() };
                    let (g, v, scan) = run(t, &cols, &vals, vector);
                    let GeneTable::Wide(w) = &wide else { unreachable!() };
                    let (wg, wv, wscan) = run(w, &cols, &vals, vector);
                    // An independent reading of the same row.
                    let kept: Vec<(i32, f32)> = cols.iter().zip(&vals).filter_map(|(&c, &v)| ids[c as usize].filter(|_| v != 0.0).map(|id| (id as i32, v))).collect();
                    let integer = vals.iter().all(|&v| v >= 0.0 && v < 8_388_608.0 && v.fract() == 0.0);
                    let what = format!("{n} entries, mix {mix}, vector {vector}");
                    assert_eq!(g, kept.iter().map(|p| p.0).collect::<Vec<_>>(), "{what}");
                    assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), kept.iter().map(|p| p.1.to_bits()).collect::<Vec<_>>(), "{what}");
                    assert_eq!((wg, wv.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), wscan), (g, v.iter().map(|x| x.to_bits()).collect(), scan), "{what}: wide table");
                    assert_eq!(scan.kept, kept.len(), "{what}");
                    assert_eq!((scan.integer, scan.at_least_one), (integer, vals.iter().all(|&v| v >= 1.0)), "{what}");
                    if integer {
                        assert_eq!(scan.max, kept.iter().map(|p| p.1 as u32).max().unwrap_or(0), "{what}");
                        assert_eq!(scan.sum, kept.iter().map(|p| p.1 as u64).sum::<u64>(), "{what}");
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        eprintln!("avx512f: {}", std::arch::is_x86_feature_detected!("avx512f"));
    }

    #[test]
    fn shard_names_round_trip() {
        assert!(is_shard_name(&shard_name("a.b", 3), "a.b"));
        assert!(!is_shard_name("a.b.00003.parquet", "a"));
    }
}
