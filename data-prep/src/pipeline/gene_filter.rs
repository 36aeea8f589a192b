//! The per-file gene filter: totals per input column summed in a fixed number of lanes (exact,
//! the same on every machine), or decided from the column indices alone where the values are
//! integer counts, reading only the values of rare genes.

use super::row_scan::{nonnegative_finite_key, POSITIVE_INFINITY_BITS};
use super::*;

/// Bytes requested at once by the gene-filter pass, which only sums, so the disk bounds it.
const GENE_FILTER_READ_AHEAD: usize = 256 << 20;

impl Prep {
    /// Vocabulary id per input column after the per-file gene filter, and how it was decided.
    /// Counts (the default for integer input read directly): from the column indices alone,
    /// plus the values of the genes stored in fewer cells than the threshold; it leaves the
    /// values' check to the binning pass. Exact: from the totals of every value, which it also
    /// checks.
    pub(super) fn gene_filter(
        &self,
        reader: &mut CsrReader,
        gm: &GeneMatch,
        names: &[String],
        hint: &CellHint,
        exact_only: bool,
    ) -> anyhow::Result<(Vec<Option<u32>>, GeneRule)> {
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
    pub(super) fn exact_gene_filter(
        &self,
        reader: &mut CsrReader,
        gm: &GeneMatch,
        names: &[String],
        hint: &CellHint,
    ) -> anyhow::Result<Vec<Option<u32>>> {
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
    fn counted_gene_filter(&self, reader: &mut CsrReader, gm: &GeneMatch) -> anyhow::Result<Option<Vec<Option<u32>>>> {
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
                    if kept {
                        *id
                    } else {
                        None
                    }
                })
                .collect(),
        ))
    }
}

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
    (first..)
        .step_by(SUM_LANES)
        .take_while(move |p| p * SUM_PIECE < end)
        .map(move |p| (p * SUM_PIECE).max(first_value) - first_value..((p + 1) * SUM_PIECE).min(end) - first_value)
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
pub(super) type CellHint<'a> = dyn Fn(usize) -> String + Sync + 'a;

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
#[inline]
fn clears(total: f64, threshold: f64) -> bool {
    total >= threshold && total > 0.0
}

/// How a file's gene filter was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GeneRule {
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
                lanes
                    .push(std::thread::Builder::new().name(format!("gene-count-{lane}")).spawn_scoped(scope, move || self.lane(lane, rx))?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::blocks_of;

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
    fn gene_counts_are_exact_and_record_every_entry_of_rare_columns() {
        // 2^18 entries (four sum pieces, so both lanes count), 64 per row, blocks of uneven
        // sizes; columns 0..200 common, 200..300 rare (every 1000th entry).
        let (n_vars, per_row, n) = (300usize, 64usize, 1usize << 18);
        let col = |k: usize| if k.is_multiple_of(1000) { 200 + (k / 1000) % 100 } else { (k * 7) % 200 } as u32;
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
}
