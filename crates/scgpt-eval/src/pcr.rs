//! scIB's principal component regression (`scib.metrics.pc_regression` / `pcr_comparison`,
//! scib 1.1.7, `linreg_method="numpy"`):
//!
//!   P = Σ_c var_c · R²(PC_c ~ batch) / Σ_c var_c
//!
//! over the first min(50, cells, features) principal components of the centred data, where
//! R² is that of a least-squares fit of the component's scores on an intercept plus the one-hot
//! batch, i.e. the between-batch share of the component's sum of squares. `PCR_batch` =
//! max(0, (P_pre − P_post) / P_pre).
//!
//! The R² needs no scores: the fitted values are the batch means of the scores,
//! (μ_b − μ)·v_c, so R²_c = Σ_b n_b ((μ_b − μ)·v_c)² / ((n − 1) λ_c).
//!
//! Components: up to [`EXACT_MAX_FEATURES`] features, the exact eigendecomposition of the
//! covariance (scanpy uses ARPACK for the top 50, or a full SVD when 50 ≥ min(cells,
//! features); both give the same components up to sign, which R² ignores). Beyond, a randomized
//! subspace iteration (Halko et al. 2011) with oversampling and power iterations, on the sparse
//! matrix with implicit centring; the result says which was used.
//!
//! Differences from scib: a numeric batch column is regressed as one numeric covariate by scib
//! (`pd.api.types.is_numeric_dtype`), here batches are always categories (the h5ad reader gives
//! strings; with two batches the two agree). scib rounds the scores to float32 before the
//! regression; here everything is f64, so values agree to ~1e-6, not to the last digit.

use anyhow::{anyhow, bail, Result};
use ndarray::{linalg::general_mat_mul, Array2};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::Serialize;

use crate::csr::CsrMatrix;

/// scib's `n_comps`.
pub const N_COMPS: usize = 50;
/// Largest feature count for the exact covariance eigendecomposition (a 4,096² f64 matrix is
/// 134 MB and decomposes in seconds).
pub const EXACT_MAX_FEATURES: usize = 4096;
/// Rows densified at once.
const BLOCK: usize = 1024;
/// Randomized subspace iteration: extra basis vectors and power iterations.
const OVERSAMPLE: usize = 30;
const POWER_ITERATIONS: usize = 8;

/// A cells × features matrix: dense row-major f32 or sparse CSR.
#[derive(Debug, Clone, Copy)]
pub enum Features<'a> {
    Dense { data: &'a [f32], dim: usize },
    Sparse(CsrMatrix<'a>),
}

impl Features<'_> {
    pub fn n_rows(&self) -> usize {
        match self {
            Features::Dense { data, dim } => data.len() / dim.max(&1),
            Features::Sparse(m) => m.n_rows(),
        }
    }
    pub fn n_cols(&self) -> usize {
        match self {
            Features::Dense { dim, .. } => *dim,
            Features::Sparse(m) => m.n_cols(),
        }
    }
    /// Rows `a..b`, minus `mean`, as a dense f64 block.
    fn centred_block(&self, a: usize, b: usize, mean: &[f64]) -> Array2<f64> {
        let g = self.n_cols();
        let mut out = Array2::<f64>::zeros((b - a, g));
        for (r, i) in (a..b).enumerate() {
            let mut row = out.row_mut(r);
            match self {
                Features::Dense { data, dim } => {
                    for (o, &v) in row.iter_mut().zip(&data[i * dim..(i + 1) * dim]) {
                        *o = v as f64;
                    }
                }
                Features::Sparse(m) => {
                    let (idx, val) = m.row(i);
                    for (&j, &v) in idx.iter().zip(val) {
                        row[j as usize] += v as f64;
                    }
                }
            }
            for (o, &m) in row.iter_mut().zip(mean) {
                *o -= m;
            }
        }
        out
    }
    fn values(&self) -> &[f32] {
        match self {
            Features::Dense { data, .. } => data,
            Features::Sparse(m) => m.values(),
        }
    }
}

/// The result of one `pc_regression`.
#[derive(Debug, Clone, Serialize)]
pub struct PcRegression {
    /// Σ var_c R²_c / Σ var_c.
    pub value: f64,
    pub n_comps: usize,
    /// "exact" (covariance eigendecomposition) or "randomized".
    pub method: &'static str,
    /// Variance of each component (n − 1 denominator).
    pub variance: Vec<f64>,
    pub r2: Vec<f64>,
}

/// Column means and per-batch column means (f64).
fn means(x: &Features, batches: &[u32], n_batches: usize) -> (Vec<f64>, Vec<Vec<f64>>, Vec<usize>) {
    let g = x.n_cols();
    let mut per = vec![vec![0f64; g]; n_batches];
    let mut count = vec![0usize; n_batches];
    for (i, &b) in batches.iter().enumerate() {
        let acc = &mut per[b as usize];
        count[b as usize] += 1;
        match x {
            Features::Dense { data, dim } => {
                for (a, &v) in acc.iter_mut().zip(&data[i * dim..(i + 1) * dim]) {
                    *a += v as f64;
                }
            }
            Features::Sparse(m) => {
                let (idx, val) = m.row(i);
                for (&j, &v) in idx.iter().zip(val) {
                    acc[j as usize] += v as f64;
                }
            }
        }
    }
    let n = batches.len() as f64;
    let mut mean = vec![0f64; g];
    for acc in &per {
        for (m, &a) in mean.iter_mut().zip(acc) {
            *m += a / n;
        }
    }
    for (acc, &c) in per.iter_mut().zip(&count) {
        if c > 0 {
            acc.iter_mut().for_each(|a| *a /= c as f64);
        }
    }
    (mean, per, count)
}

/// scib's `pc_regression(data, covariate, n_comps=50)` with the covariate one-hot encoded:
/// `batches` holds a batch code (< `n_batches`) per row.
pub fn pc_regression(x: Features, batches: &[u32], n_batches: usize) -> Result<PcRegression> {
    let (n, g) = (x.n_rows(), x.n_cols());
    if n != batches.len() {
        bail!("PCR: {n} rows but {} batch values", batches.len());
    }
    if n < 2 || g == 0 {
        bail!("PCR needs at least 2 cells and 1 feature (got {n} × {g})");
    }
    if batches.iter().any(|&b| b as usize >= n_batches) {
        bail!("PCR: a batch code is out of range for {n_batches} batches");
    }
    if let Some(p) = x.values().iter().position(|v| !v.is_finite()) {
        bail!("PCR: the matrix has NaN or infinite values (stored value {p}); PCA is undefined on them");
    }
    let n_comps = N_COMPS.min(n).min(g);
    let (mean, batch_mean, count) = means(&x, batches, n_batches);
    let (variance, vectors, method) = if g <= EXACT_MAX_FEATURES {
        let (v, u) = exact_components(&x, &mean, n_comps)?;
        (v, u, "exact")
    } else {
        let (v, u) = randomized_components(&x, &mean, n_comps)?;
        (v, u, "randomized")
    };
    // R² from the batch means of the scores.
    let mut r2 = Vec::with_capacity(n_comps);
    for c in 0..variance.len() {
        let ss_tot = (n - 1) as f64 * variance[c];
        let mut ss_between = 0.0;
        for b in 0..n_batches {
            if count[b] == 0 {
                continue;
            }
            let proj: f64 = (0..g).map(|f| (batch_mean[b][f] - mean[f]) * vectors[[f, c]]).sum();
            ss_between += count[b] as f64 * proj * proj;
        }
        // A zero-variance component has no R² (scib: 0/0 = NaN); its weight is 0 anyway.
        r2.push(if ss_tot > 0.0 { (ss_between / ss_tot).clamp(0.0, 1.0) } else { 0.0 });
    }
    let total: f64 = variance.iter().sum();
    let value = if total > 0.0 { variance.iter().zip(&r2).map(|(v, r)| v * r).sum::<f64>() / total } else { 0.0 };
    Ok(PcRegression { value, n_comps, method, variance, r2 })
}

/// scib's `pcr` on an existing PCA (`adata.obsm["X_pca"]` with `adata.uns["pca"]["variance"]`,
/// which scib uses for `adata_pre` when both exist): each column of `pcs` (row-major, `dim`
/// per row) is regressed on the batch as is, weighted by `variance`; no PCA is computed.
pub fn pc_regression_precomputed(pcs: &[f32], dim: usize, variance: &[f64], batches: &[u32], n_batches: usize) -> Result<PcRegression> {
    if dim == 0 || !pcs.len().is_multiple_of(dim) || pcs.len() / dim != batches.len() {
        bail!("PCR: {} values do not make {} rows of {dim}", pcs.len(), batches.len());
    }
    if variance.len() != dim {
        bail!("PCR: {dim} principal components but {} variances", variance.len());
    }
    if pcs.iter().any(|v| !v.is_finite()) || variance.iter().any(|v| !v.is_finite()) {
        bail!("PCR: the principal components or their variances have NaN or infinite values");
    }
    let n = batches.len();
    let x = Features::Dense { data: pcs, dim };
    let (mean, batch_mean, count) = means(&x, batches, n_batches);
    let mut r2 = Vec::with_capacity(dim);
    for c in 0..dim {
        let ss_tot: f64 = (0..n).map(|i| (pcs[i * dim + c] as f64 - mean[c]).powi(2)).sum();
        let ss_between: f64 = (0..n_batches).map(|b| count[b] as f64 * (batch_mean[b][c] - mean[c]).powi(2)).sum();
        r2.push(if ss_tot > 0.0 { (ss_between / ss_tot).clamp(0.0, 1.0) } else { 0.0 });
    }
    let total: f64 = variance.iter().sum();
    let value = if total > 0.0 { variance.iter().zip(&r2).map(|(v, r)| v * r).sum::<f64>() / total } else { 0.0 };
    Ok(PcRegression { value, n_comps: dim, method: "precomputed", variance: variance.to_vec(), r2 })
}

/// Top `k` eigenpairs of the covariance (n − 1 denominator), exact. Returns (variances,
/// features × k vectors).
fn exact_components(x: &Features, mean: &[f64], k: usize) -> Result<(Vec<f64>, Array2<f64>)> {
    let (n, g) = (x.n_rows(), x.n_cols());
    // A few partial sums in parallel; bounded so memory stays a few g² matrices.
    let parts = rayon::current_num_threads().clamp(1, 4).min(n.div_ceil(BLOCK));
    let rows_per = n.div_ceil(parts);
    let cov = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut cov = Array2::<f64>::zeros((g, g));
            let (a, b) = (p * rows_per, ((p + 1) * rows_per).min(n));
            for s in (a..b).step_by(BLOCK) {
                let blk = x.centred_block(s, (s + BLOCK).min(b), mean);
                general_mat_mul(1.0, &blk.t(), &blk, 1.0, &mut cov);
            }
            cov
        })
        .reduce(|| Array2::<f64>::zeros((g, g)), |a, b| a + b);
    let cov_f = faer::Mat::<f64>::from_fn(g, g, |i, j| cov[[i, j]] / (n - 1) as f64);
    drop(cov);
    let evd = cov_f.self_adjoint_eigen(faer::Side::Lower).map_err(|e| anyhow!("PCA eigendecomposition did not converge: {e:?}"))?;
    let (u, s) = (evd.U(), evd.S().column_vector());
    // faer sorts eigenvalues increasingly: the components are the last k, reversed.
    let mut vectors = Array2::<f64>::zeros((g, k));
    let mut variance = Vec::with_capacity(k);
    for c in 0..k {
        let src = g - 1 - c;
        variance.push(s[src].max(0.0));
        for f in 0..g {
            vectors[[f, c]] = u[(f, src)];
        }
    }
    Ok((variance, vectors))
}

/// (X − 1μᵀ) · Q for a features × l matrix Q: n × l.
fn times(x: &Features, mean: &[f64], q: &Array2<f64>) -> Array2<f64> {
    let (n, l) = (x.n_rows(), q.ncols());
    let mq: Vec<f64> = (0..l).map(|c| (0..q.nrows()).map(|f| mean[f] * q[[f, c]]).sum()).collect();
    let mut out = Array2::<f64>::zeros((n, l));
    let chunks: Vec<_> = out.axis_chunks_iter_mut(ndarray::Axis(0), BLOCK).collect();
    chunks.into_par_iter().enumerate().for_each(|(bi, mut chunk)| {
        for r in 0..chunk.nrows() {
            let i = bi * BLOCK + r;
            let mut row = chunk.row_mut(r);
            match x {
                Features::Dense { data, dim } => {
                    for (f, &v) in data[i * dim..(i + 1) * dim].iter().enumerate() {
                        row.scaled_add(v as f64, &q.row(f));
                    }
                }
                Features::Sparse(m) => {
                    let (idx, val) = m.row(i);
                    for (&j, &v) in idx.iter().zip(val) {
                        row.scaled_add(v as f64, &q.row(j as usize));
                    }
                }
            }
            for (o, &m) in row.iter_mut().zip(&mq) {
                *o -= m;
            }
        }
    });
    out
}

/// (X − 1μᵀ)ᵀ · Y for an n × l matrix Y: features × l.
fn times_t(x: &Features, mean: &[f64], y: &Array2<f64>) -> Array2<f64> {
    let (n, g, l) = (x.n_rows(), x.n_cols(), y.ncols());
    let parts = rayon::current_num_threads().clamp(1, 8).min(n.div_ceil(BLOCK));
    let rows_per = n.div_ceil(parts);
    let mut out = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut acc = Array2::<f64>::zeros((g, l));
            for i in p * rows_per..((p + 1) * rows_per).min(n) {
                let yi = y.row(i);
                match x {
                    Features::Dense { data, dim } => {
                        for (f, &v) in data[i * dim..(i + 1) * dim].iter().enumerate() {
                            acc.row_mut(f).scaled_add(v as f64, &yi);
                        }
                    }
                    Features::Sparse(m) => {
                        let (idx, val) = m.row(i);
                        for (&j, &v) in idx.iter().zip(val) {
                            acc.row_mut(j as usize).scaled_add(v as f64, &yi);
                        }
                    }
                }
            }
            acc
        })
        .reduce(|| Array2::<f64>::zeros((g, l)), |a, b| a + b);
    let col_sums = y.sum_axis(ndarray::Axis(0));
    for (f, &m) in mean.iter().enumerate() {
        out.row_mut(f).scaled_add(-m, &col_sums);
    }
    out
}

/// An orthonormal basis of the columns of `a` (thin QR).
fn orthonormal(a: &Array2<f64>) -> Array2<f64> {
    let m = faer::Mat::<f64>::from_fn(a.nrows(), a.ncols(), |i, j| a[[i, j]]);
    let q = m.qr().compute_thin_Q();
    Array2::from_shape_fn((q.nrows(), q.ncols()), |(i, j)| q[(i, j)])
}

/// Top `k` principal components by randomized subspace iteration on the implicitly centred
/// matrix; seeded, so deterministic.
fn randomized_components(x: &Features, mean: &[f64], k: usize) -> Result<(Vec<f64>, Array2<f64>)> {
    let (n, g) = (x.n_rows(), x.n_cols());
    let l = (k + OVERSAMPLE).min(n).min(g);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let omega = Array2::from_shape_fn((g, l), |_| StandardNormal.sample(&mut rng));
    let mut q = orthonormal(&times(x, mean, &omega));
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal(&times_t(x, mean, &q));
        q = orthonormal(&times(x, mean, &z));
    }
    // B = Qᵀ A; its right singular vectors are the components. Bᵀ = Aᵀ Q (g × l).
    let bt = times_t(x, mean, &q);
    let mut small = Array2::<f64>::zeros((l, l));
    general_mat_mul(1.0, &bt.t(), &bt, 0.0, &mut small);
    let sf = faer::Mat::<f64>::from_fn(l, l, |i, j| small[[i, j]]);
    let evd = sf.self_adjoint_eigen(faer::Side::Lower).map_err(|e| anyhow!("PCA eigendecomposition did not converge: {e:?}"))?;
    let (u, s) = (evd.U(), evd.S().column_vector());
    let mut vectors = Array2::<f64>::zeros((g, k));
    let mut variance = Vec::with_capacity(k);
    for c in 0..k.min(l) {
        let src = l - 1 - c;
        let sigma2 = s[src].max(0.0);
        variance.push(sigma2 / (n - 1) as f64);
        if sigma2 > 0.0 {
            let sigma = sigma2.sqrt();
            for f in 0..g {
                let v: f64 = (0..l).map(|t| bt[[f, t]] * u[(t, src)]).sum();
                vectors[[f, c]] = v / sigma;
            }
        }
    }
    Ok((variance, vectors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn planted(n: usize, g: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(n * g);
        let mut b = Vec::with_capacity(n);
        for i in 0..n {
            let batch = (i % 3) as u32;
            b.push(batch);
            for f in 0..g {
                let signal = if f % 7 == 0 { batch as f32 * 2.0 } else { 0.0 };
                let v: f32 = rng.random::<f32>() * (1.0 + (f % 5) as f32) + signal;
                x.push(if rng.random::<f32>() < 0.5 { 0.0 } else { v });
            }
        }
        (x, b)
    }

    /// Scores computed explicitly, R² by an explicit between/total split.
    fn by_scores(x: &[f32], g: usize, b: &[u32], vectors: &Array2<f64>, c: usize) -> f64 {
        let n = b.len();
        let mean: Vec<f64> = (0..g).map(|f| (0..n).map(|i| x[i * g + f] as f64).sum::<f64>() / n as f64).collect();
        let s: Vec<f64> = (0..n).map(|i| (0..g).map(|f| (x[i * g + f] as f64 - mean[f]) * vectors[[f, c]]).sum()).collect();
        let mut bm = [0f64; 3];
        let mut bc = [0f64; 3];
        for i in 0..n {
            bm[b[i] as usize] += s[i];
            bc[b[i] as usize] += 1.0;
        }
        let tot: f64 = s.iter().map(|v| v * v).sum();
        let fitted: f64 = s.iter().enumerate().map(|(i, _)| (bm[b[i] as usize] / bc[b[i] as usize]).powi(2)).sum();
        fitted / tot
    }

    #[test]
    fn r2_matches_explicit_scores() {
        let (n, g) = (300, 60);
        let (x, b) = planted(n, g, 1);
        let r = pc_regression(Features::Dense { data: &x, dim: g }, &b, 3).unwrap();
        assert_eq!((r.n_comps, r.method), (50, "exact"));
        let (mean, _, _) = means(&Features::Dense { data: &x, dim: g }, &b, 3);
        let (_, vecs) = exact_components(&Features::Dense { data: &x, dim: g }, &mean, 50).unwrap();
        for c in [0, 1, 10, 49] {
            assert!((r.r2[c] - by_scores(&x, g, &b, &vecs, c)).abs() < 1e-10);
        }
        assert!(r.value > 0.05 && r.value < 1.0, "{}", r.value);
    }

    #[test]
    fn sparse_and_dense_agree_and_randomized_is_close() {
        let (n, g) = (400, 90);
        let (x, b) = planted(n, g, 2);
        let (mut ip, mut ix, mut v) = (vec![0usize], vec![], vec![]);
        for i in 0..n {
            for f in 0..g {
                if x[i * g + f] != 0.0 {
                    ix.push(f as u32);
                    v.push(x[i * g + f]);
                }
            }
            ip.push(ix.len());
        }
        let sp = Features::Sparse(CsrMatrix::new(&ip, &ix, &v, g).unwrap());
        let dense = pc_regression(Features::Dense { data: &x, dim: g }, &b, 3).unwrap();
        let sparse = pc_regression(sp, &b, 3).unwrap();
        assert!((dense.value - sparse.value).abs() < 1e-12);
        let (mean, bmean, count) = means(&sp, &b, 3);
        let (var, vecs) = randomized_components(&sp, &mean, 50).unwrap();
        // The leading components converge first; the weighted sum is what PCR reports.
        for (c, (&got, &want)) in var.iter().zip(&dense.variance).take(10).enumerate() {
            assert!((got - want).abs() < 1e-3 * want, "{c}: {got} vs {want}");
        }
        let mut num = 0.0;
        for c in 0..50 {
            let mut between = 0.0;
            for k in 0..3 {
                let p: f64 = (0..g).map(|f| (bmean[k][f] - mean[f]) * vecs[[f, c]]).sum();
                between += count[k] as f64 * p * p;
            }
            num += between / (n - 1) as f64;
        }
        let approx = num / var.iter().sum::<f64>();
        assert!((approx - dense.value).abs() < 0.01 * dense.value, "{approx} vs {}", dense.value);
    }

    #[test]
    fn precomputed_pcs_give_the_same_value() {
        let (n, g) = (200, 30);
        let (x, b) = planted(n, g, 4);
        let r = pc_regression(Features::Dense { data: &x, dim: g }, &b, 3).unwrap();
        // The scores of the exact components, as scanpy would store them in obsm["X_pca"].
        let (mean, _, _) = means(&Features::Dense { data: &x, dim: g }, &b, 3);
        let (var, vecs) = exact_components(&Features::Dense { data: &x, dim: g }, &mean, r.n_comps).unwrap();
        let k = r.n_comps;
        let pcs: Vec<f32> = (0..n)
            .flat_map(|i| {
                let (x, mean, vecs) = (&x, &mean, &vecs);
                (0..k).map(move |c| (0..g).map(|f| (x[i * g + f] as f64 - mean[f]) * vecs[[f, c]]).sum::<f64>() as f32)
            })
            .collect();
        let p = pc_regression_precomputed(&pcs, k, &var, &b, 3).unwrap();
        assert_eq!(p.method, "precomputed");
        assert!((p.value - r.value).abs() < 1e-6, "{} vs {}", p.value, r.value);
        assert!(pc_regression_precomputed(&pcs, k, &var[1..], &b, 3).is_err());
    }

    #[test]
    fn one_batch_gives_zero_and_bad_input_is_an_error() {
        let (x, _) = planted(50, 10, 3);
        let r = pc_regression(Features::Dense { data: &x, dim: 10 }, &[0; 50], 1).unwrap();
        assert_eq!(r.value, 0.0);
        assert!(pc_regression(Features::Dense { data: &x, dim: 10 }, &[0; 49], 1).is_err());
        let mut bad = x.clone();
        bad[3] = f32::NAN;
        assert!(pc_regression(Features::Dense { data: &bad, dim: 10 }, &[0; 50], 1).is_err());
    }
}
