//! PCA on selected genes of sparse log data: centred by the training mean, not scaled, from the
//! exact eigendecomposition of the feature covariance. The dense matrix is never held whole:
//! rows are densified a block at a time, so memory is features² + block × features.

use anyhow::{anyhow, bail, Result};
use ndarray::{linalg::general_mat_mul, s, Array2, ArrayView1};

use crate::preprocess::LogNormalized;

/// Rows densified at once.
const BLOCK: usize = 2048;

#[derive(Debug, Clone)]
pub struct Pca {
    /// Per-feature training mean.
    pub mean: Vec<f64>,
    /// Features × components, unit columns, by decreasing variance (sign arbitrary).
    pub components: Array2<f64>,
    /// Variance along each component (sample variance, n − 1).
    pub explained_variance: Vec<f64>,
}

/// Maps the columns of a matrix onto the PCA features (None: not used). Several columns may map
/// to one feature; their values add up.
pub type FeatureMap = [Option<usize>];

fn dense_block(x: &LogNormalized, rows: std::ops::Range<usize>, map: &FeatureMap, mean: &[f64]) -> Array2<f64> {
    let mut out = Array2::<f64>::zeros((rows.len(), mean.len()));
    for (r, i) in rows.enumerate() {
        let (idx, val) = x.row(i);
        let mut row = out.row_mut(r);
        for (&j, &v) in idx.iter().zip(val) {
            if let Some(f) = map[j as usize] {
                row[f] += v as f64;
            }
        }
        row -= &ArrayView1::from(mean);
    }
    out
}

impl Pca {
    /// Fits `k` components on the rows of `x` mapped through `map` onto `n_features` features.
    /// `k` is capped at min(cells, features), as scikit-learn requires.
    pub fn fit(x: &LogNormalized, map: &FeatureMap, n_features: usize, k: usize) -> Result<Pca> {
        let n = x.n_rows();
        if n < 2 {
            bail!("PCA needs at least 2 training cells, got {n}");
        }
        let k = k.min(n).min(n_features);
        if k == 0 {
            bail!("PCA with 0 components (no features selected)");
        }
        let mut mean = vec![0f64; n_features];
        for (&j, &v) in x.indices.iter().zip(&x.data) {
            if let Some(f) = map[j as usize] {
                mean[f] += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);

        let mut cov = Array2::<f64>::zeros((n_features, n_features));
        for start in (0..n).step_by(BLOCK) {
            let block = dense_block(x, start..(start + BLOCK).min(n), map, &mean);
            general_mat_mul(1.0 / (n - 1) as f64, &block.t(), &block, 1.0, &mut cov);
        }
        let cov_f = faer::Mat::<f64>::from_fn(n_features, n_features, |i, j| cov[[i, j]]);
        drop(cov);
        let evd = cov_f.self_adjoint_eigen(faer::Side::Lower).map_err(|e| anyhow!("PCA eigendecomposition did not converge: {e:?}"))?;
        // faer sorts eigenvalues in increasing order; the components are the last k, reversed.
        let (u, eig) = (evd.U(), evd.S().column_vector());
        let mut components = Array2::<f64>::zeros((n_features, k));
        let mut explained_variance = Vec::with_capacity(k);
        for c in 0..k {
            let src = n_features - 1 - c;
            explained_variance.push(eig[src].max(0.0));
            for f in 0..n_features {
                components[[f, c]] = u[(f, src)];
            }
        }
        Ok(Pca { mean, components, explained_variance })
    }

    pub fn n_components(&self) -> usize {
        self.components.ncols()
    }

    /// Cells × components: (x − training mean) · components.
    pub fn transform(&self, x: &LogNormalized, map: &FeatureMap) -> Array2<f64> {
        let n = x.n_rows();
        let mut out = Array2::<f64>::zeros((n, self.n_components()));
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let block = dense_block(x, start..end, map, &self.mean);
            general_mat_mul(1.0, &block, &self.components, 0.0, &mut out.slice_mut(s![start..end, ..]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_dominant_direction() {
        // Points spread along (1, 1, 0) with a little noise on the third feature.
        let (mut ip, mut ix, mut d) = (vec![0], vec![], vec![]);
        for i in 0..20 {
            let t = i as f32 - 9.5;
            for (j, v) in [(0u32, 20.0 + t), (1, 20.0 + t), (2, 5.0 + 0.1 * (i % 3) as f32)] {
                ix.push(j);
                d.push(v);
            }
            ip.push(ix.len());
        }
        let x = LogNormalized { indptr: ip, indices: ix, data: d, n_cols: 3 };
        let map = [Some(0), Some(1), Some(2)];
        let pca = Pca::fit(&x, &map, 3, 2).unwrap();
        // Each component satisfies cov · v = λ v, with cov computed here directly.
        let dense = Array2::from_shape_fn((20, 3), |(i, j)| x.data[3 * i + j] as f64);
        let centred = &dense - &dense.mean_axis(ndarray::Axis(0)).unwrap();
        let cov = centred.t().dot(&centred) / 19.0;
        for c in 0..2 {
            let v = pca.components.column(c);
            let lam = pca.explained_variance[c];
            let resid = &cov.dot(&v) - &(&v * lam);
            assert!(resid.iter().all(|r| r.abs() < 1e-9), "{c}: {resid}");
            assert!((v.dot(&v) - 1.0).abs() < 1e-12);
        }
        assert!(pca.explained_variance[0] > 100.0 * pca.explained_variance[1]);
        let c0 = pca.components.column(0);
        assert!((c0[0] - c0[1]).abs() < 1e-3 && c0[2].abs() < 1e-2);
        let z = pca.transform(&x, &map);
        assert_eq!(z.dim(), (20, 2));
        let col_mean: f64 = z.column(0).sum() / 20.0;
        assert!(col_mean.abs() < 1e-9);
    }
}
