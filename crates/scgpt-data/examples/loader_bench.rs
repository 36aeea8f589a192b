//! Loader throughput: `cargo run --release -p scgpt-data --example loader_bench -- DIR [CELLS]`
//! Reads shuffled training batches of 32 from an scgpt-prep directory and prints cells/s.

use std::time::Instant;

use scgpt_data::loader::{DataPosition, Loader, LoaderConfig, ShardSet};

fn main() -> anyhow::Result<()> {
    // As scgpt-train does at start.
    scgpt_data::alloc::tune_for_tensors();
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: loader_bench DIR [CELLS]");
    let limit: usize = args.next().map(|s| s.parse().expect("CELLS is a number")).unwrap_or(200_000);
    let set = ShardSet::open(std::path::Path::new(&dir), 1.0)?;
    let total = set.cells();
    let loader = Loader::new(vec![set], LoaderConfig { batch_size: 32, ..Default::default() })?;
    let t0 = Instant::now();
    let (mut cells, mut values) = (0usize, 0usize);
    for batch in loader.train_epoch(DataPosition::default()) {
        let b = batch?;
        cells += b.cells.len();
        values += b.cells.genes.len();
        if cells >= limit {
            break;
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{cells} of {total} cells in {s:.2} s: {:.0} cells/s, {:.1} M gene values/s ({:.0} genes per cell)",
        cells as f64 / s,
        values as f64 / s / 1e6,
        values as f64 / cells.max(1) as f64
    );
    Ok(())
}
