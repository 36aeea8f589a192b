//! The gene-level preprocessing of scGPT's `Preprocessor`, ported from scanpy 1.11.5 step for step
//! so that the same genes come out:
//!
//! - [`filter_genes_min_counts`]: `sc.pp.filter_genes(adata, min_counts=k)`.
//! - [`normalize_log1p`]: `sc.pp.normalize_total(target_sum=...)` then `sc.pp.log1p`.
//! - [`highly_variable_genes`]: `sc.pp.highly_variable_genes(adata, n_top_genes=n, flavor=...,
//!   batch_key=...)` for the flavors `seurat_v3` (on counts), `cell_ranger` and `seurat` (on log1p
//!   data), with or without batches, on the matrix as given.
//!
//! Arithmetic follows scanpy's where it decides which genes are chosen: per-gene sums in f64 over
//! the cells in order with squares taken in f32 (scanpy's numba kernel squares the float32 values
//! as float32), f32 normalisation, pandas' bin edges, numpy's percentiles, pandas' compensated
//! group means and Welford standard deviations, statsmodels' MAD, and scikit-misc's LOESS with
//! its k-d tree and vertex interpolation (the private `loess` module). Measured against scanpy on
//! the bundled real data (`crates/scgpt-cli/tests/hvg_reference.rs`): the same genes and
//! bit-identical diagnostics for `seurat` and `cell_ranger`; for `seurat_v3` normalised variances
//! within 5e-13 and the same genes up to ties.
//!
//! Two things are not reproducible, and both only matter for genes whose scores are exactly equal
//! at the cut: numpy's argsort is not stable, so the seurat_v3 ranks of exactly tied normalised
//! variances (genes with the same UMI pattern, common among rare genes) follow numpy's sort kernel
//! (CPU dependent) where the port ranks them in gene order; and when batches are combined for
//! `seurat`/`cell_ranger`, pandas breaks exact ties by gene name, the port by gene index.

use std::str::FromStr;

use anyhow::{bail, Context, Result};

use crate::csr::CsrMatrix;
use crate::loess;

/// Owned CSR rows of log1p-normalised values.
#[derive(Debug, Clone)]
pub struct LogNormalized {
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub data: Vec<f32>,
    pub n_cols: usize,
}

impl LogNormalized {
    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[i], self.indptr[i + 1]);
        (&self.indices[a..b], &self.data[a..b])
    }
    /// A checked borrowed view, e.g. to pass to [`highly_variable_genes`].
    pub fn as_csr(&self) -> Result<CsrMatrix<'_>> {
        CsrMatrix::new(&self.indptr, &self.indices, &self.data, self.n_cols)
    }
}

/// Each cell scaled to `target_sum` in total, then `ln(1 + x)`, in scanpy's float32 arithmetic:
/// the cell total is summed in f64 and stored as f32, divided by `target_sum` in f32, and each
/// value divided by that factor in f32 (so the result is bit-identical to scanpy's on float32
/// input). Cells with no counts stay zero (scanpy divides them by 1). Negative or non-finite
/// values are errors: they are not counts, and `what` names the matrix.
pub fn normalize_log1p(x: &CsrMatrix, target_sum: f64, what: &str) -> Result<LogNormalized> {
    if !(target_sum.is_finite() && target_sum > 0.0) {
        bail!("{what}: normalize_total's target sum must be a positive number, got {target_sum}");
    }
    let nnz: usize = (0..x.n_rows()).map(|i| x.row(i).0.len()).sum();
    let mut data = Vec::with_capacity(nnz);
    let mut indices = Vec::with_capacity(nnz);
    let mut indptr = Vec::with_capacity(x.n_rows() + 1);
    indptr.push(0);
    let target = target_sum as f32;
    for i in 0..x.n_rows() {
        let (idx, val) = x.row(i);
        if let Some(v) = val.iter().find(|v| !v.is_finite() || **v < 0.0) {
            bail!("{what}: cell {i} has the value {v}; expected non-negative counts (or expm1 of log1p data)");
        }
        let total: f64 = val.iter().map(|&v| v as f64).sum();
        let factor = total as f32 / target;
        let factor = if factor == 0.0 { 1.0 } else { factor };
        for (&j, &v) in idx.iter().zip(val) {
            indices.push(j);
            data.push((v / factor).ln_1p());
        }
        indptr.push(indices.len());
    }
    Ok(LogNormalized { indptr, indices, data, n_cols: x.n_cols() })
}

/// scanpy's `filter_genes(min_counts=k)`: keep a gene when its total over all cells is at least
/// `min_counts`. The totals are float32 sums in cell order, as scipy computes `X.sum(axis=0)` on
/// float32 data (exact for integer counts below 2^24).
pub fn filter_genes_min_counts(x: &CsrMatrix, min_counts: f64) -> Vec<bool> {
    let mut totals = vec![0f32; x.n_cols()];
    for i in 0..x.n_rows() {
        let (idx, val) = x.row(i);
        for (&j, &v) in idx.iter().zip(val) {
            totals[j as usize] += v;
        }
    }
    totals.iter().map(|&t| t as f64 >= min_counts).collect()
}

/// The `flavor` of scanpy's `highly_variable_genes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvgFlavor {
    /// `"seurat_v3"`: normalised variance against a LOESS fit of log variance on log mean.
    /// Expects counts.
    SeuratV3,
    /// `"cell_ranger"`: dispersion normalised by median and MAD within mean percentile bins.
    /// Expects log1p data.
    CellRanger,
    /// `"seurat"`: log dispersion of expm1(x) normalised within equal-width mean bins. Expects
    /// log1p data.
    Seurat,
}

impl HvgFlavor {
    /// scanpy's name for the flavor.
    pub fn as_str(self) -> &'static str {
        match self {
            HvgFlavor::SeuratV3 => "seurat_v3",
            HvgFlavor::CellRanger => "cell_ranger",
            HvgFlavor::Seurat => "seurat",
        }
    }
}

impl FromStr for HvgFlavor {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "seurat_v3" => Ok(HvgFlavor::SeuratV3),
            "cell_ranger" => Ok(HvgFlavor::CellRanger),
            "seurat" => Ok(HvgFlavor::Seurat),
            _ => bail!("unknown highly variable genes flavor {s:?}; expected seurat_v3, cell_ranger or seurat"),
        }
    }
}

/// Options of [`highly_variable_genes`]; [`HvgOptions::new`] gives scanpy's defaults.
#[derive(Debug, Clone, Copy)]
pub struct HvgOptions<'a> {
    /// `n_top_genes`.
    pub n_top: usize,
    pub flavor: HvgFlavor,
    /// One batch id per cell (`batch_key`); batches are processed in ascending id order, so
    /// number them in the order of the batch column's categories.
    pub batch: Option<&'a [u32]>,
    /// Number of equal-width mean bins for `seurat` (scanpy's default 20; `cell_ranger` always
    /// uses percentile bins).
    pub n_bins: usize,
    /// LOESS span for `seurat_v3` (scanpy's default 0.3).
    pub span: f64,
}

impl<'a> HvgOptions<'a> {
    pub fn new(n_top: usize, flavor: HvgFlavor) -> Self {
        HvgOptions { n_top, flavor, batch: None, n_bins: 20, span: 0.3 }
    }
}

/// The genes chosen and the per-gene columns scanpy writes to `adata.var`, by scanpy's names.
/// Columns a flavor does not produce are `None`.
#[derive(Debug, Clone)]
pub struct HvgResult {
    /// Indices of the highly variable genes, ascending (`highly_variable`).
    pub selected: Vec<usize>,
    /// `means`: mean per gene; for `seurat` log1p of the mean of expm1(x); averaged over batches
    /// for `seurat`/`cell_ranger` with batches (0 where a batch does not express the gene).
    pub means: Vec<f64>,
    /// `variances` (seurat_v3): unbiased variance per gene over all cells.
    pub variances: Option<Vec<f64>>,
    /// `variances_norm` (seurat_v3): normalised variance, averaged over batches.
    pub variances_norm: Option<Vec<f64>>,
    /// `highly_variable_rank` (seurat_v3): rank by normalised variance (0 = most variable),
    /// median over the batches where it is below `n_top`; NaN where it is in none.
    pub highly_variable_rank: Option<Vec<f64>>,
    /// `dispersions` (seurat, cell_ranger): variance / mean, log for seurat.
    pub dispersions: Option<Vec<f64>>,
    /// `dispersions_norm` (seurat, cell_ranger): dispersion normalised within its mean bin.
    pub dispersions_norm: Option<Vec<f64>>,
    /// `highly_variable_nbatches` (with batches): in how many batches the gene was highly variable.
    pub highly_variable_nbatches: Option<Vec<u32>>,
}

/// scanpy 1.11.5 `sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor=..., batch_key=...)`
/// on `x` (cells × genes) as given: raw counts for `seurat_v3`, log1p data for the others.
///
/// Single batch: `seurat_v3` takes the `n_top` genes of highest normalised variance; `seurat`
/// and `cell_ranger` take every gene whose normalised dispersion reaches the `n_top`-th highest
/// (ties at the cut all kept, so possibly more than `n_top`).
/// With batches: `seurat_v3` ranks genes within each batch and orders them by the median rank
/// (then by the number of batches where they rank below `n_top`); `seurat` and `cell_ranger`
/// select within each batch (genes it does not express get zeros) and order genes by that count,
/// then by the mean normalised dispersion. Exactly `n_top` genes are taken (or all of them).
///
/// Errors where scanpy fails: a LOESS neighbourhood too degenerate to fit (scikit-misc raises,
/// typical for unfiltered genes with one or two UMIs in small data), duplicate `cell_ranger` bin
/// edges (pandas raises when more than 5% of the genes share a mean), no gene with a non-NaN
/// normalised dispersion; and on bad input: non-finite values, negative counts for `seurat_v3`,
/// a batch vector of the wrong length, fewer than 2 cells in a batch.
pub fn highly_variable_genes(x: &CsrMatrix, opts: &HvgOptions) -> Result<HvgResult> {
    let (n, g) = (x.n_rows(), x.n_cols());
    if opts.n_top == 0 {
        bail!("highly variable genes: n_top must be at least 1");
    }
    if g == 0 {
        bail!("highly variable genes: the matrix has no genes");
    }
    for i in 0..n {
        let val = x.row(i).1;
        if let Some(v) = val.iter().find(|v| !v.is_finite()) {
            bail!("highly variable genes: cell {i} has the value {v}");
        }
        if opts.flavor == HvgFlavor::SeuratV3 {
            if let Some(v) = val.iter().find(|v| **v < 0.0) {
                bail!("highly variable genes (seurat_v3 expects counts): cell {i} has the negative value {v}");
            }
        }
    }
    let batches = batch_rows(n, opts.batch)?;
    match opts.flavor {
        HvgFlavor::SeuratV3 => seurat_v3(x, opts, &batches),
        HvgFlavor::Seurat | HvgFlavor::CellRanger => {
            if opts.flavor == HvgFlavor::Seurat && opts.n_bins == 0 {
                bail!("highly variable genes: n_bins must be at least 1");
            }
            if opts.batch.is_none() {
                let rows = &batches[0].1;
                let (mean, var) = mean_var(x, rows, opts.flavor);
                let genes: Vec<usize> = (0..g).collect();
                let sb = dispersion_single_batch(&mean, &var, &genes, opts)?;
                let selected = (0..g).filter(|&j| sb.hv[j]).collect();
                Ok(HvgResult {
                    selected,
                    means: sb.means,
                    variances: None,
                    variances_norm: None,
                    highly_variable_rank: None,
                    dispersions: Some(sb.dispersions),
                    dispersions_norm: Some(sb.norm),
                    highly_variable_nbatches: None,
                })
            } else {
                dispersion_batched(x, opts, &batches)
            }
        }
    }
}

/// The existing annotation-baseline entry point: `seurat` HVGs of log1p data, every gene when
/// there are no more than `n_top` (the baseline skips scanpy's selection then).
pub fn highly_variable_seurat(x: &LogNormalized, n_top: usize, n_bins: usize) -> Result<Vec<usize>> {
    let g = x.n_cols;
    if g <= n_top {
        return Ok((0..g).collect());
    }
    let n = x.n_rows();
    if n < 2 {
        bail!("highly variable genes need at least 2 training cells, got {n}");
    }
    let opts = HvgOptions { n_bins, ..HvgOptions::new(n_top, HvgFlavor::Seurat) };
    Ok(highly_variable_genes(&x.as_csr()?, &opts)?.selected)
}

/// The cells of each batch, in ascending batch id order (all cells as one batch without ids).
fn batch_rows(n: usize, batch: Option<&[u32]>) -> Result<Vec<(u32, Vec<usize>)>> {
    let Some(ids) = batch else {
        if n < 2 {
            bail!("highly variable genes need at least 2 cells, got {n}");
        }
        return Ok(vec![(0, (0..n).collect())]);
    };
    if ids.len() != n {
        bail!("highly variable genes: {} batch ids for {n} cells", ids.len());
    }
    let mut map = std::collections::BTreeMap::<u32, Vec<usize>>::new();
    for (i, &b) in ids.iter().enumerate() {
        map.entry(b).or_default().push(i);
    }
    if let Some((b, rows)) = map.iter().find(|(_, r)| r.len() < 2) {
        bail!(
            "highly variable genes: batch {b} has {} cell; every batch needs at least 2 (scanpy's \
             per-batch variances are undefined with one)",
            rows.len()
        );
    }
    Ok(map.into_iter().collect())
}

/// scanpy's `_get_mean_var` over the given rows, as its numba kernel computes it with one thread:
/// f64 sums over the cells in order of each value and of its square taken in f32, mean = sum / n,
/// variance = sumsq / n - mean², times n / (n - 1). For `seurat` the values are expm1(x) in f32
/// first, as scanpy applies `np.expm1` to the float32 matrix.
fn mean_var(x: &CsrMatrix, rows: &[usize], flavor: HvgFlavor) -> (Vec<f64>, Vec<f64>) {
    let g = x.n_cols();
    let (mut sum, mut sumsq) = (vec![0f64; g], vec![0f64; g]);
    let expm1 = flavor == HvgFlavor::Seurat;
    for &i in rows {
        let (idx, val) = x.row(i);
        for (&j, &v) in idx.iter().zip(val) {
            let v = if expm1 { v.exp_m1() } else { v };
            sum[j as usize] += v as f64;
            sumsq[j as usize] += (v * v) as f64;
        }
    }
    let nf = rows.len() as f64;
    let correction = if rows.len() != 1 { nf / (nf - 1.0) } else { 1.0 };
    let mean: Vec<f64> = sum.iter().map(|&s| s / nf).collect();
    let var = sumsq.iter().zip(&mean).map(|(&q, &m)| (q / nf - m * m) * correction).collect();
    (mean, var)
}

/// Per-gene output of scanpy's `_highly_variable_genes_single_batch` for the genes it was given.
struct SingleBatch {
    means: Vec<f64>,
    dispersions: Vec<f64>,
    norm: Vec<f64>,
    hv: Vec<bool>,
}

/// `_highly_variable_genes_single_batch` for `seurat`/`cell_ranger` on the genes `genes` (their
/// mean and variance given for all genes): dispersion, mean bins, normalisation within bins,
/// and the top-n cut over these genes only.
fn dispersion_single_batch(mean_all: &[f64], var_all: &[f64], genes: &[usize], opts: &HvgOptions) -> Result<SingleBatch> {
    let seurat = opts.flavor == HvgFlavor::Seurat;
    let mut means = Vec::with_capacity(genes.len());
    let mut disp = Vec::with_capacity(genes.len());
    for &j in genes {
        let m = if mean_all[j] == 0.0 { 1e-12 } else { mean_all[j] };
        let d = var_all[j] / m;
        if seurat {
            // logarithmised mean and dispersion as in Seurat; a zero dispersion becomes NaN
            disp.push(if d == 0.0 { f64::NAN } else { d.ln() });
            means.push(m.ln_1p());
        } else {
            disp.push(d);
            means.push(m);
        }
    }
    let bins = if seurat { cut_equal_width(&means, opts.n_bins) } else { cut_percentiles(&means)? };
    let n_groups = bins.iter().copied().max().map_or(0, |b| b + 1);
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); n_groups];
    for (&b, &d) in bins.iter().zip(&disp) {
        members[b].push(d);
    }
    let stats: Vec<(f64, f64)> = members
        .iter()
        .map(|vals| {
            if seurat {
                // pandas groupby mean/std skip NaN; a bin with a single value has no std and
                // scanpy then normalises that gene to 1 (avg 0, dev = its dispersion).
                let present: Vec<f64> = vals.iter().copied().filter(|v| !v.is_nan()).collect();
                let avg = pandas_mean(&present);
                let dev = pandas_std(&present);
                if dev.is_nan() {
                    (0.0, avg)
                } else {
                    (avg, dev)
                }
            } else {
                (pandas_median(vals), statsmodels_mad(vals))
            }
        })
        .collect();
    let norm: Vec<f64> = disp.iter().zip(&bins).map(|(&d, &b)| (d - stats[b].0) / stats[b].1).collect();

    // _subset_genes / _nth_highest: the n-th highest non-NaN value is the cut; genes reach it
    // after np.nan_to_num(nan=-inf), which also maps ±inf to the largest finite magnitudes.
    let mut ranked: Vec<f64> = norm.iter().copied().filter(|v| !v.is_nan()).collect();
    if ranked.is_empty() {
        bail!("every gene's normalised dispersion is NaN (no gene varies); cannot choose highly variable genes");
    }
    ranked.sort_by(|a, b| b.total_cmp(a));
    let k = opts.n_top.min(genes.len()).min(ranked.len());
    let cut = ranked[k - 1];
    let hv = norm
        .iter()
        .map(|&v| {
            let v = if v.is_nan() {
                f64::NEG_INFINITY
            } else if v == f64::INFINITY {
                f64::MAX
            } else if v == f64::NEG_INFINITY {
                f64::MIN
            } else {
                v
            };
            v >= cut
        })
        .collect();
    Ok(SingleBatch { means, dispersions: disp, norm, hv })
}

/// `_highly_variable_genes_batched` for `seurat`/`cell_ranger`.
fn dispersion_batched(x: &CsrMatrix, opts: &HvgOptions, batches: &[(u32, Vec<usize>)]) -> Result<HvgResult> {
    let g = x.n_cols();
    let mut means = KahanMean::new(g);
    let mut disps = KahanMean::new(g);
    let mut norms = KahanMean::new(g);
    let mut nbatches = vec![0u32; g];
    for (b, rows) in batches {
        // filter_genes(min_cells=1) within the batch: genes with a value > 0 in some cell
        let mut expressed = vec![false; g];
        for &i in rows {
            let (idx, val) = x.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                if v > 0.0 {
                    expressed[j as usize] = true;
                }
            }
        }
        let genes: Vec<usize> = (0..g).filter(|&j| expressed[j]).collect();
        if genes.is_empty() {
            bail!("highly variable genes: batch {b} expresses no gene");
        }
        let (mean, var) = mean_var(x, rows, opts.flavor);
        let sb = dispersion_single_batch(&mean, &var, &genes, opts).with_context(|| format!("highly variable genes in batch {b}"))?;
        // genes the batch does not express count as zeros in every column
        let mut k = 0;
        for (j, nb) in nbatches.iter_mut().enumerate() {
            if k < genes.len() && genes[k] == j {
                means.add(j, sb.means[k]);
                disps.add(j, sb.dispersions[k]);
                norms.add(j, sb.norm[k]);
                *nb += sb.hv[k] as u32;
                k += 1;
            } else {
                means.add(j, 0.0);
                disps.add(j, 0.0);
                norms.add(j, 0.0);
            }
        }
    }
    let norm = norms.finish();
    // sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False,
    // na_position="last"), stable. scanpy's frame is indexed by gene name at this point (its
    // groupby sorted it), so exact ties go by name there and by gene index here.
    let mut order: Vec<usize> = (0..g).collect();
    order.sort_by(|&a, &b| nbatches[b].cmp(&nbatches[a]).then_with(|| desc_nan_last(norm[a], norm[b])));
    let mut selected: Vec<usize> = order[..opts.n_top.min(g)].to_vec();
    selected.sort_unstable();
    Ok(HvgResult {
        selected,
        means: means.finish(),
        variances: None,
        variances_norm: None,
        highly_variable_rank: None,
        dispersions: Some(disps.finish()),
        dispersions_norm: Some(norm),
        highly_variable_nbatches: Some(nbatches),
    })
}

/// `_highly_variable_genes_seurat_v3` with flavor "seurat_v3".
fn seurat_v3(x: &CsrMatrix, opts: &HvgOptions, batches: &[(u32, Vec<usize>)]) -> Result<HvgResult> {
    let g = x.n_cols();
    let all_rows: Vec<usize> = (0..x.n_rows()).collect();
    let (means, variances) = mean_var(x, &all_rows, HvgFlavor::SeuratV3);
    let mut norm_vars: Vec<Vec<f64>> = Vec::with_capacity(batches.len());
    for (b, rows) in batches {
        let (mean, var) = mean_var(x, rows, HvgFlavor::SeuratV3);
        let not_const: Vec<usize> = (0..g).filter(|&j| var[j] > 0.0).collect();
        let lx: Vec<f64> = not_const.iter().map(|&j| mean[j].log10()).collect();
        let ly: Vec<f64> = not_const.iter().map(|&j| var[j].log10()).collect();
        let fitted = loess::fitted_values(&lx, &ly, opts.span).with_context(|| {
            let which = if opts.batch.is_some() { format!(" in batch {b}") } else { String::new() };
            format!("seurat_v3 highly variable genes{which} ({} genes vary)", not_const.len())
        })?;
        let mut estimat = vec![0f64; g];
        for (&j, &f) in not_const.iter().zip(&fitted) {
            estimat[j] = f;
        }
        let reg_std: Vec<f64> = estimat.iter().map(|&e| 10f64.powf(e).sqrt()).collect();
        // clip each value at reg_std * sqrt(n) + mean, as Seurat does
        let n_obs = rows.len() as f64;
        let vmax = n_obs.sqrt();
        let clip: Vec<f64> = reg_std.iter().zip(&mean).map(|(&s, &m)| s * vmax + m).collect();
        let (mut sum, mut sumsq) = (vec![0f64; g], vec![0f64; g]);
        for &i in rows {
            let (idx, val) = x.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                let e = (v as f64).min(clip[j as usize]);
                sumsq[j as usize] += e * e;
                sum[j as usize] += e;
            }
        }
        let norm: Vec<f64> = (0..g)
            .map(|j| {
                (1.0 / ((n_obs - 1.0) * (reg_std[j] * reg_std[j]))) * ((n_obs * (mean[j] * mean[j])) + sumsq[j] - 2.0 * sum[j] * mean[j])
            })
            .collect();
        norm_vars.push(norm);
    }
    // Ranks within each batch, 0 = most variable. numpy's argsort(-v) is not stable, so the order
    // of exactly equal normalised variances is numpy's business; here they go by gene index.
    let n_top = opts.n_top;
    let mut nbatches = vec![0u32; g];
    let mut ranks_below: Vec<Vec<f64>> = vec![Vec::new(); g];
    for norm in &norm_vars {
        let mut order: Vec<usize> = (0..g).collect();
        order.sort_by(|&a, &b| desc_nan_last(norm[a], norm[b]));
        for (rank, &j) in order.iter().enumerate() {
            if rank < n_top {
                nbatches[j] += 1;
                ranks_below[j].push(rank as f64);
            }
        }
    }
    // np.ma.median over the ranks below n_top; NaN where there are none
    let rank: Vec<f64> = ranks_below.iter_mut().map(|r| median_sorted(r)).collect();
    let nb = norm_vars.len() as f64;
    let mut variances_norm = norm_vars[0].clone();
    for norm in &norm_vars[1..] {
        for (a, &v) in variances_norm.iter_mut().zip(norm) {
            *a += v;
        }
    }
    for a in variances_norm.iter_mut() {
        *a /= nb;
    }
    // sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False],
    // na_position="last"), stable, then the first n_top.
    let mut order: Vec<usize> = (0..g).collect();
    order.sort_by(|&a, &b| asc_nan_last(rank[a], rank[b]).then_with(|| nbatches[b].cmp(&nbatches[a])));
    let mut selected: Vec<usize> = order[..n_top.min(g)].to_vec();
    selected.sort_unstable();
    Ok(HvgResult {
        selected,
        means,
        variances: Some(variances),
        variances_norm: Some(variances_norm),
        highly_variable_rank: Some(rank),
        dispersions: None,
        dispersions_norm: None,
        highly_variable_nbatches: opts.batch.map(|_| nbatches),
    })
}

fn asc_nan_last(a: f64, b: f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (false, false) => a.total_cmp(&b),
        (x, y) => x.cmp(&y),
    }
}

fn desc_nan_last(a: f64, b: f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (false, false) => b.total_cmp(&a),
        (x, y) => x.cmp(&y),
    }
}

/// Median of the values (sorted in place), the mean of the two middle ones for an even count
/// (numpy, pandas); NaN for none.
fn median_sorted(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// pandas' groupby median: NaN skipped.
fn pandas_median(vals: &[f64]) -> f64 {
    let mut v: Vec<f64> = vals.iter().copied().filter(|x| !x.is_nan()).collect();
    median_sorted(&mut v)
}

/// statsmodels `robust.mad(a)` as scanpy's cell_ranger flavor calls it: median(|a - median(a)| / c)
/// with c = Φ⁻¹(3/4) (dividing before the median, as statsmodels does); NaN propagates as in
/// np.median.
fn statsmodels_mad(vals: &[f64]) -> f64 {
    const GAUSSIAN_3_4: f64 = 0.6744897501960817;
    if vals.is_empty() || vals.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let mut v = vals.to_vec();
    let center = median_sorted(&mut v);
    let mut err: Vec<f64> = vals.iter().map(|&a| (a - center).abs() / GAUSSIAN_3_4).collect();
    median_sorted(&mut err)
}

/// pandas' groupby mean (Kahan-compensated sum / count) of non-NaN values; NaN for none.
fn pandas_mean(vals: &[f64]) -> f64 {
    let mut k = KahanMean::new(1);
    for &v in vals {
        k.add(0, v);
    }
    k.finish()[0]
}

/// pandas' groupby std (ddof 1) by Welford's update, as its `group_var`; NaN below 2 values.
fn pandas_std(vals: &[f64]) -> f64 {
    let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for &v in vals {
        n += 1.0;
        let old = mean;
        mean += (v - old) / n;
        m2 += (v - mean) * (v - old);
    }
    if n < 2.0 {
        f64::NAN
    } else {
        (m2 / (n - 1.0)).sqrt()
    }
}

/// Per-gene Kahan-compensated means skipping NaN, as pandas' `group_mean`.
struct KahanMean {
    sum: Vec<f64>,
    comp: Vec<f64>,
    count: Vec<u32>,
}

impl KahanMean {
    fn new(g: usize) -> Self {
        KahanMean { sum: vec![0.0; g], comp: vec![0.0; g], count: vec![0; g] }
    }
    fn add(&mut self, j: usize, v: f64) {
        if v.is_nan() {
            return;
        }
        self.count[j] += 1;
        let y = v - self.comp[j];
        let t = self.sum[j] + y;
        self.comp[j] = t - self.sum[j] - y;
        if self.comp[j].is_nan() {
            // an infinite value: keep the infinite sum rather than NaN (pandas GH#50367)
            self.comp[j] = 0.0;
        }
        self.sum[j] = t;
    }
    fn finish(self) -> Vec<f64> {
        self.sum.iter().zip(&self.count).map(|(&s, &c)| if c == 0 { f64::NAN } else { s / c as f64 }).collect()
    }
}

/// cell_ranger's bins: pandas `cut` at [-inf, np.percentile(means, 10, 15, ..., 100), inf],
/// right-closed. pandas refuses duplicate edges, and so does this (scanpy fails the same way).
fn cut_percentiles(means: &[f64]) -> Result<Vec<usize>> {
    let mut sorted = means.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut edges = vec![f64::NEG_INFINITY];
    for q in (10..105).step_by(5) {
        edges.push(numpy_percentile_sorted(&sorted, q as f64));
    }
    edges.push(f64::INFINITY);
    if let Some(w) = edges.windows(2).find(|w| w[0] >= w[1]) {
        bail!(
            "cell_ranger mean bins: the percentile edges of the gene means are not unique (e.g. {}); more \
             than 5% of the genes share a mean, typically unexpressed genes. scanpy fails the same way \
             (pandas: \"Bin edges must be unique\"); filter genes first",
            w[0]
        );
    }
    Ok(means.iter().map(|&v| edges.partition_point(|&e| e < v) - 1).collect())
}

/// np.percentile(a, q) with the default "linear" method on ascending `sorted`, with numpy's
/// `_lerp` (which interpolates from the upper neighbour when the fraction is at least 0.5).
fn numpy_percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let virt = (n - 1) as f64 * (q / 100.0);
    if virt >= (n - 1) as f64 {
        return sorted[n - 1];
    }
    let prev = virt.floor();
    let gamma = virt - prev;
    let (a, b) = (sorted[prev as usize], sorted[prev as usize + 1]);
    let diff = b - a;
    if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    }
}

/// pandas `cut(values, bins=n)`: `n` equal-width, right-closed bins from min to max, the first
/// edge lowered by 0.1% of the range so the minimum falls in bin 0.
fn cut_equal_width(values: &[f64], n: usize) -> Vec<usize> {
    let mn = values.iter().copied().fold(f64::INFINITY, f64::min);
    let mx = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if mn == mx {
        // pandas widens a zero range by 0.1% on each side.
        let pad = |v: f64| if v != 0.0 { 0.001 * v.abs() } else { 0.001 };
        (mn - pad(mn), mx + pad(mx))
    } else {
        (mn, mx)
    };
    // numpy linspace: start + i * step, the last edge set to stop exactly.
    let step = (hi - lo) / n as f64;
    let mut edges: Vec<f64> = (0..=n).map(|i| lo + i as f64 * step).collect();
    edges[n] = hi;
    if mn != mx {
        edges[0] -= (mx - mn) * 0.001;
    }
    // Right-closed: the bin i with edges[i] < v <= edges[i+1], i.e. searchsorted(side=left) - 1.
    values
        .iter()
        .map(|&v| {
            let k = edges.partition_point(|&e| e < v);
            k.saturating_sub(1).min(n - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_then_log1p() {
        let (ip, ix, d) = (vec![0, 2, 2], vec![0u32, 2], vec![1.0f32, 3.0]);
        let x = CsrMatrix::new(&ip, &ix, &d, 3).unwrap();
        let l = normalize_log1p(&x, 1e4, "m").unwrap();
        assert!((l.data[0] - 2501f32.ln()).abs() < 1e-5);
        assert!((l.data[1] - 7501f32.ln()).abs() < 1e-5);
        assert_eq!(l.indptr, vec![0, 2, 2]);
        let bad = vec![1.0f32, -1.0];
        assert!(normalize_log1p(&CsrMatrix::new(&ip, &ix, &bad, 3).unwrap(), 1e4, "m").is_err());
    }

    #[test]
    fn cut_matches_pandas() {
        // pd.cut([0, 1, 2, 3, 4], 4, labels=False) -> [0, 0, 1, 2, 3]
        assert_eq!(cut_equal_width(&[0.0, 1.0, 2.0, 3.0, 4.0], 4), vec![0, 0, 1, 2, 3]);
        assert_eq!(cut_equal_width(&[5.0, 5.0], 3), vec![1, 1]);
    }

    #[test]
    fn picks_the_overdispersed_gene() {
        // One mean bin, so only dispersions compete; gene 2 is far more variable than the rest.
        let rows: Vec<Vec<f32>> = vec![
            vec![10.0, 10.0, 1.0, 10.0, 100.0],
            vec![11.0, 9.0, 30.0, 10.0, 100.0],
            vec![9.0, 11.0, 1.0, 10.5, 100.0],
            vec![10.0, 10.0, 8.0, 9.5, 100.0],
        ];
        let (mut ip, mut ix, mut d) = (vec![0], vec![], vec![]);
        for r in &rows {
            for (j, &v) in r.iter().enumerate() {
                ix.push(j as u32);
                d.push(v);
            }
            ip.push(ix.len());
        }
        let x = CsrMatrix::new(&ip, &ix, &d, 5).unwrap();
        let l = normalize_log1p(&x, 1e4, "m").unwrap();
        let hvg = highly_variable_seurat(&l, 1, 1).unwrap();
        assert_eq!(hvg, vec![2]);
        assert_eq!(highly_variable_seurat(&l, 5, 20).unwrap().len(), 5);
    }

    #[test]
    fn percentiles_match_numpy() {
        // np.percentile([0.5, 3.25, 1, 7.5, 2, 2, 9.75], np.arange(10, 105, 5)), printed by numpy 2.4
        let mut a = vec![0.5, 3.25, 1.0, 7.5, 2.0, 2.0, 9.75];
        a.sort_by(f64::total_cmp);
        let want = [
            0.8,
            0.95,
            1.2000000000000002,
            1.5,
            1.7999999999999998,
            2.0,
            2.0,
            2.0,
            2.0,
            2.3750000000000004,
            2.7499999999999996,
            3.1250000000000004,
            4.099999999999997,
            5.375,
            6.650000000000003,
            7.725,
            8.4,
            9.075,
            9.75,
        ];
        for (q, w) in (10..105).step_by(5).zip(want) {
            assert_eq!(numpy_percentile_sorted(&a, q as f64), w, "q = {q}");
        }
        // ... whose repeated 2.0 edges pandas refuses ("Bin edges must be unique")
        assert!(cut_percentiles(&a).is_err());
    }

    #[test]
    fn group_statistics_match_pandas_and_statsmodels() {
        // statsmodels.robust.mad, pandas Series.std / mean, printed by the libraries
        assert_eq!(statsmodels_mad(&[0.5, 3.25, 1.0, 7.5, 2.0, 2.0, 9.75]), 1.8532527731320025);
        assert_eq!(statsmodels_mad(&[0.1, 0.7, 0.2, 0.25]), 0.11119516638792015);
        assert_eq!(pandas_std(&[0.1, 0.7, 0.2, 0.25]), 0.2657536453183662);
        assert_eq!(pandas_mean(&[0.1, 0.7, 0.2, 0.25]), 0.3125);
        assert_eq!(pandas_std(&[0.1, 0.2, 0.3, 0.4, 0.7, 0.9, 1.2]), 0.40355562548072954);
        assert_eq!(pandas_mean(&[0.1, 0.2, 0.3, 0.4, 0.7, 0.9, 1.2]), 0.5428571428571428);
        assert!(pandas_std(&[1.0]).is_nan());
        assert!(pandas_median(&[f64::NAN]).is_nan());
        assert_eq!(pandas_median(&[3.0, f64::NAN, 1.0]), 2.0);
    }

    fn csr(rows: &[Vec<f32>]) -> (Vec<usize>, Vec<u32>, Vec<f32>, usize) {
        let (mut ip, mut ix, mut d) = (vec![0], vec![], vec![]);
        for r in rows {
            for (j, &v) in r.iter().enumerate() {
                if v != 0.0 {
                    ix.push(j as u32);
                    d.push(v);
                }
            }
            ip.push(ix.len());
        }
        (ip, ix, d, rows[0].len())
    }

    #[test]
    fn filter_by_counts() {
        let (ip, ix, d, g) = csr(&[vec![1.0, 0.0, 2.0, 0.0], vec![1.0, 0.0, 0.5, 3.0], vec![0.0, 2.0, 0.0, 0.0]]);
        let x = CsrMatrix::new(&ip, &ix, &d, g).unwrap();
        assert_eq!(filter_genes_min_counts(&x, 2.5), vec![false, false, true, true]);
        assert_eq!(filter_genes_min_counts(&x, 0.0), vec![true; 4]);
    }

    #[test]
    fn hvg_rejects_bad_input() {
        let (ip, ix, d, g) = csr(&[vec![1.0, 0.0, 2.0], vec![1.0, 4.0, 0.5], vec![3.0, 2.0, 1.0]]);
        let x = CsrMatrix::new(&ip, &ix, &d, g).unwrap();
        let o = HvgOptions::new(1, HvgFlavor::CellRanger);
        assert!(highly_variable_genes(&x, &HvgOptions { n_top: 0, ..o }).is_err());
        assert!(highly_variable_genes(&x, &HvgOptions { batch: Some(&[0, 1]), ..o }).is_err(), "length");
        let e = highly_variable_genes(&x, &HvgOptions { batch: Some(&[0, 0, 1]), ..o }).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        let bad = vec![1.0f32, f32::NAN, 2.0, 1.0, 4.0, 0.5, 3.0, 2.0];
        let xb = CsrMatrix::new(&ip, &ix, &bad, g).unwrap();
        assert!(highly_variable_genes(&xb, &o).is_err());
        let neg = vec![1.0f32, -2.0, 2.0, 1.0, 4.0, 0.5, 3.0, 2.0];
        let xn = CsrMatrix::new(&ip, &ix, &neg, g).unwrap();
        assert!(highly_variable_genes(&xn, &HvgOptions::new(1, HvgFlavor::SeuratV3)).is_err());
        assert_eq!("cell_ranger".parse::<HvgFlavor>().unwrap(), HvgFlavor::CellRanger);
        assert!("seurat_v4".parse::<HvgFlavor>().is_err());
    }
}
