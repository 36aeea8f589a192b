//! Time per value of binning real cells: `bin_bench <shard.parquet> [row_groups]`. Reads a
//! shard's expressions, bins every cell with random and with lowest ties, through the checked
//! entry point and the one for values already checked; one thread, best of five.
use std::time::Instant;

use arrow_array::cast::AsArray;
use arrow_array::Array;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use scgpt_data::binning::{Binner, TieBreak, DEFAULT_N_BINS};
use scgpt_data::seed::SplitMix64;

fn main() -> anyhow::Result<()> {
    // As the binaries run: freed buffers reused, not page-faulted in again.
    scgpt_data::alloc::tune_for_tensors();
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or_else(|| anyhow::anyhow!("usage: bin_bench <shard.parquet> [row_groups]"))?;
    let groups: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?.with_row_groups((0..groups).collect()).build()?;
    let mut cells: Vec<Vec<f32>> = Vec::new();
    for batch in reader {
        let batch = batch?;
        let list = batch.column_by_name("expressions").ok_or_else(|| anyhow::anyhow!("{path}: no expressions column"))?.as_list::<i32>();
        for i in 0..list.len() {
            cells.push(list.value(i).as_primitive::<arrow_array::types::Float32Type>().values().to_vec());
        }
    }
    let values: usize = cells.iter().map(Vec::len).sum();
    let maxes: Vec<u32> = cells.iter().map(|c| c.iter().fold(0.0f32, |m, &v| m.max(v)) as u32).collect();
    // Cells the pre-checked entry point may take: integers in 1..SMALL_INT_LIMIT.
    let small: Vec<bool> = cells
        .iter()
        .zip(&maxes)
        .map(|(c, &m)| m < scgpt_data::binning::SMALL_INT_LIMIT && c.iter().all(|&v| v >= 1.0 && v.fract() == 0.0))
        .collect();
    println!("{} cells, {:.0} values per cell", cells.len(), values as f64 / cells.len() as f64);
    let mut binner = Binner::new();
    let mut out = Vec::with_capacity(values);
    let mut checksum = 0u64;
    for (name, checked, random) in
        [("checked, random ties", true, true), ("checked, lowest ties", true, false), ("pre-checked, random ties", false, true)]
    {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            out.clear();
            let t = Instant::now();
            for (k, ((c, &max), &small)) in cells.iter().zip(&maxes).zip(&small).enumerate() {
                let mut rng = SplitMix64::for_item(1, 2, k as u64);
                let ties = if random { TieBreak::Random(&mut rng) } else { TieBreak::Lowest };
                if checked || !small {
                    binner.append_nonzero_bins(c, DEFAULT_N_BINS, ties, &mut out);
                } else {
                    // SAFETY: checked above (`small`).
                    unsafe { binner.append_small_int_bins(c, max, DEFAULT_N_BINS, ties, &mut out) };
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        checksum = out.iter().fold(checksum, |h, &b| h.wrapping_mul(31).wrapping_add(b as u64));
        println!("{name:26} {:6.3} ns/value", best * 1e9 / values as f64);
    }
    println!("checksum {checksum:x}");
    Ok(())
}
