//! The binning pass: row blocks streamed from the reader, cells binned in chunks on the
//! rayon pool, shards written and finished on threads of their own.

use super::gene_filter::CellHint;
use super::row_scan::{compact_row, nonnegative_finite_key, GeneId, GeneTable, POSITIVE_INFINITY_BITS};
use super::*;

/// Bytes requested at once by the binning pass, bound by the cores: enough to keep them fed,
/// few enough that the shard writes are not queued behind a long line of reads.
const BINNING_READ_AHEAD: usize = 48 << 20;

/// Row blocks being binned at once. Three rather than two: idle + iowait fell and the 250k-cell
/// file ran 7.6 s against 8.4 s (mean of four interleaved runs each), for ~40 MB more.
const BLOCKS_BINNING: usize = 3;

impl Prep {
    /// The binning pass from `start_row`: reader threads (several blocks in flight), rayon
    /// workers binning blocks, a writer thread encoding Parquet and a thread finishing full
    /// shards, after `shards`. `check_all`: also check every stored value of the file (the
    /// counted gene filter did not read them) and report whether one was below 1. Returns all
    /// shards, the cells in them, and that report.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bin_pass(
        &self,
        file: &FilePass,
        reader: &mut CsrReader,
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
                reader_ref.stream_rows(start_row, n_obs, block_cells, BINNING_READ_AHEAD, |block| {
                    block_tx.send(block.map_err(anyhow::Error::from)).is_ok()
                });
            });
            // Finishing a shard (its last row group, the disk thread's tail, fsync, rename) took
            // 0.1-0.8 s: on the writer thread it stalled the whole pipeline, ~10% of the run.
            let (finish_tx, finish_rx) = crossbeam_channel::bounded::<(ShardWriter, usize, bool, bool)>(1);
            let next_shard = shards.len();
            let finisher = std::thread::Builder::new().name("shard-finisher".into()).spawn_scoped(
                scope,
                move || -> anyhow::Result<(Vec<ShardRecord>, usize)> {
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
                },
            )?;
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
}

/// What the binning pass needs of the file it bins.
#[derive(Clone, Copy)]
pub(super) struct FilePass<'a> {
    pub(super) stem: &'a str,
    pub(super) path: &'a Path,
    pub(super) n_obs: usize,
    pub(super) names: &'a [String],
    pub(super) hint: &'a CellHint<'a>,
    pub(super) keep_cell: &'a [bool],
    pub(super) obs_values: &'a [Vec<String>],
    pub(super) cell_ids: &'a ObsNames,
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

    fn bin_chunk_with<G: GeneId>(
        &self,
        gene_ids: &[G],
        binner: &mut Binner,
        block: &RowBlock,
        rows: &[usize],
    ) -> anyhow::Result<BinnedChunk> {
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
            let (genes, values) =
                (&mut out.genes.spare_capacity_mut()[..cols.len()], &mut out.expressions.spare_capacity_mut()[..cols.len()]);
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
                    let v = clean_value(v, self.allow_non_integer)
                        .map_err(|why| value_error(self.path, &(self.hint)(row), &self.names[c as usize], v, why))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::blocks_of;

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
        assert!(a.lists.genes.contains(&52_000), "the vocabulary's ids, not the columns'");
    }
}
