//! scanpy's `normalize_total(target_sum=1e4)` + `log1p`, and `highly_variable_genes` with
//! `flavor="seurat"` (scanpy 1.11, `_highly_variable_genes_single_batch`), step for step so
//! the same genes come out.

use anyhow::{bail, Result};

use crate::csr::CsrMatrix;

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
}

/// Each cell scaled to `target_sum` in total, then `ln(1 + x)`, stored as f32 as scanpy does on
/// float32 input. Cells with no counts stay zero (scanpy divides them by 1). Negative or
/// non-finite values are errors: they are not counts, and `what` names the matrix.
pub fn normalize_log1p(x: &CsrMatrix, target_sum: f64, what: &str) -> Result<LogNormalized> {
    let mut data = Vec::with_capacity(x.row(0).0.len() * x.n_rows());
    let mut indices = Vec::with_capacity(data.capacity());
    let mut indptr = Vec::with_capacity(x.n_rows() + 1);
    indptr.push(0);
    for i in 0..x.n_rows() {
        let (idx, val) = x.row(i);
        if let Some(v) = val.iter().find(|v| !v.is_finite() || **v < 0.0) {
            bail!("{what}: cell {i} has the value {v}; expected non-negative counts (or expm1 of log1p data)");
        }
        let total: f64 = val.iter().map(|&v| v as f64).sum();
        let scale = if total > 0.0 { target_sum / total } else { 1.0 };
        for (&j, &v) in idx.iter().zip(val) {
            indices.push(j);
            data.push(((v as f64 * scale) as f32).ln_1p());
        }
        indptr.push(indices.len());
    }
    Ok(LogNormalized { indptr, indices, data, n_cols: x.n_cols() })
}

/// Indices (ascending) of the highly variable genes of `x` (log1p data) by the Seurat rule.
/// Returns every gene when there are no more than `n_top` of them.
pub fn highly_variable_seurat(x: &LogNormalized, n_top: usize, n_bins: usize) -> Result<Vec<usize>> {
    let g = x.n_cols;
    if g <= n_top {
        return Ok((0..g).collect());
    }
    let n = x.n_rows();
    if n < 2 {
        bail!("highly variable genes need at least 2 training cells, got {n}");
    }
    // Mean and unbiased variance of expm1(x) per gene (scanpy's _get_mean_var: f64 sums).
    let (mut sum, mut sumsq) = (vec![0f64; g], vec![0f64; g]);
    for (&j, &v) in x.indices.iter().zip(&x.data) {
        let e = v.exp_m1() as f64;
        sum[j as usize] += e;
        sumsq[j as usize] += e * e;
    }
    let nf = n as f64;
    let mut means = vec![0f64; g];
    let mut disp = vec![0f64; g];
    for j in 0..g {
        let mean = sum[j] / nf;
        let var = (sumsq[j] / nf - mean * mean) * (nf / (nf - 1.0));
        let mean = if mean == 0.0 { 1e-12 } else { mean };
        let d = var / mean;
        disp[j] = if d == 0.0 { f64::NAN } else { d.ln() };
        means[j] = mean.ln_1p();
    }
    let bins = cut_equal_width(&means, n_bins);

    // Per-bin mean and sample std of the non-NaN dispersions (pandas skips NaN).
    let mut acc = vec![(0usize, 0f64); n_bins];
    for j in 0..g {
        if !disp[j].is_nan() {
            acc[bins[j]].0 += 1;
            acc[bins[j]].1 += disp[j];
        }
    }
    let avg: Vec<f64> = acc.iter().map(|&(c, s)| if c == 0 { f64::NAN } else { s / c as f64 }).collect();
    let mut ss = vec![0f64; n_bins];
    for j in 0..g {
        if !disp[j].is_nan() {
            ss[bins[j]] += (disp[j] - avg[bins[j]]).powi(2);
        }
    }
    let stats: Vec<(f64, f64)> = (0..n_bins)
        .map(|b| {
            let c = acc[b].0;
            let dev = if c < 2 { f64::NAN } else { (ss[b] / (c - 1) as f64).sqrt() };
            // scanpy: a bin whose std is undefined (one gene) normalises that gene to 1.
            if dev.is_nan() {
                (0.0, avg[b])
            } else {
                (avg[b], dev)
            }
        })
        .collect();
    let norm: Vec<f64> = (0..g).map(|j| (disp[j] - stats[bins[j]].0) / stats[bins[j]].1).collect();

    // The n-th highest non-NaN value is the cut-off; ties at it are all kept, as in scanpy.
    let mut finite: Vec<f64> = norm.iter().copied().filter(|v| !v.is_nan()).collect();
    if finite.is_empty() {
        bail!("no gene varies across the training cells; cannot choose highly variable genes");
    }
    finite.sort_by(|a, b| b.total_cmp(a));
    let cut = finite[n_top.min(finite.len()) - 1];
    Ok((0..g).filter(|&j| !norm[j].is_nan() && norm[j] >= cut).collect())
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
}
