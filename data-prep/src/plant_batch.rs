//! A batch effect planted into real cells, so an integration benchmark knows the truth: a
//! seeded random share of the cells (`--fraction`, default half) becomes batch "B", the rest
//! "A"; in B every gene's counts are scaled by its own factor exp(N(0, σ²)) (`--gene-scale-sd`)
//! and every cell's library by `--library-shift`, and the scaled counts are drawn back to
//! integers (Poisson around the scaled value, so B looks sequenced differently, not just
//! rescaled — which rank-based binning would undo). obs keeps the named columns and gains
//! `planted_batch`; X holds the new counts, the var index the gene names.

use std::path::PathBuf;

use anyhow::Context;
use rand::Rng;
use rand_distr::{Distribution, Normal, Poisson};
use scgpt_data::h5ad::{Column, Frame, H5adReader, H5adWriter, MatrixChoice};
use scgpt_data::seed::rng_for;

#[derive(Debug, Clone, clap::Args)]
pub struct PlantBatchArgs {
    /// A real h5ad of counts (raw/X when present, else X).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// obs columns copied (labels, the real batches); repeatable.
    #[arg(long = "keep-col")]
    pub keep_cols: Vec<String>,
    /// var column with the gene names (default: the var index).
    #[arg(long)]
    pub gene_col: Option<String>,
    /// Share of cells in the planted batch B.
    #[arg(long, default_value_t = 0.5)]
    pub fraction: f64,
    /// Standard deviation of the per-gene log scale factor in B.
    #[arg(long, default_value_t = 0.5)]
    pub gene_scale_sd: f64,
    /// Library-size factor of B.
    #[arg(long, default_value_t = 2.0)]
    pub library_shift: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: &PlantBatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.fraction > 0.0 && a.fraction < 1.0, "--fraction = {} must be in (0, 1): both batches need cells", a.fraction);
    anyhow::ensure!(a.gene_scale_sd >= 0.0 && a.gene_scale_sd.is_finite(), "--gene-scale-sd must be >= 0");
    anyhow::ensure!(a.library_shift > 0.0 && a.library_shift.is_finite(), "--library-shift must be positive");
    let mut r = H5adReader::open(&a.input, MatrixChoice::RawThenX)?;
    let genes = r.var_names(a.gene_col.as_deref())?;
    let names = r.obs_names()?;
    let kept: Vec<Vec<String>> =
        a.keep_cols.iter().map(|c| r.obs_column(c).with_context(|| format!("--keep-col {c:?}"))).collect::<anyhow::Result<_>>()?;
    let block = r.read_rows(0, r.n_obs())?;
    if let Some(v) = block.data.iter().find(|v| !v.is_finite() || **v < 0.0 || v.fract() != 0.0) {
        anyhow::bail!("{}: the value {v} is not a count; planting a batch effect needs raw counts (raw/X or X)", a.input.display());
    }
    let mut rng = rng_for(a.seed, 0xBA7C, 0);
    let normal = Normal::new(0.0, a.gene_scale_sd).expect("finite sd");
    let scale: Vec<f64> = (0..genes.len()).map(|_| normal.sample(&mut rng).exp()).collect();
    let in_b: Vec<bool> = (0..names.len()).map(|_| rng.random_bool(a.fraction)).collect();
    let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
    for (i, &b) in in_b.iter().enumerate() {
        let (idx, val) = block.row(i);
        let mut cell = rng_for(a.seed, 0xCE11, i as u64);
        for (&j, &v) in idx.iter().zip(val) {
            let x = if b {
                let mean = v as f64 * scale[j as usize] * a.library_shift;
                Poisson::new(mean).map(|p| p.sample(&mut cell)).unwrap_or(0.0) as f32
            } else {
                v
            };
            if x > 0.0 {
                indices.push(j);
                data.push(x);
            }
        }
        indptr.push(data.len());
    }
    let mut w = H5adWriter::create(&a.out, genes.len())?;
    w.append_rows(&indptr, &indices, &data)?;
    let batch: Vec<&str> = in_b.iter().map(|&b| if b { "B" } else { "A" }).collect();
    let mut columns: Vec<(String, Column)> = a.keep_cols.iter().zip(&kept).map(|(c, v)| (c.clone(), Column::categorical_from(v))).collect();
    columns.push(("planted_batch".into(), Column::categorical_from(&batch)));
    w.finish(&Frame { index: names, columns }, &Frame { index: genes, columns: Vec::new() })?;
    let n_b = in_b.iter().filter(|b| **b).count();
    eprintln!("wrote {} ({} cells: {} in planted batch B, {} in A)", a.out.display(), in_b.len(), n_b, in_b.len() - n_b);
    Ok(())
}
