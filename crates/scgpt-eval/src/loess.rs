//! One-predictor LOESS as scikit-misc's `loess(x, y, span, degree=2)` computes its fitted values,
//! which is what scanpy's `highly_variable_genes(flavor="seurat_v3")` uses: Cleveland, Grosse and
//! Shyu's netlib `dloess` with its defaults, family gaussian (no robustness iterations) and
//! surface "interpolate".
//!
//! "interpolate" does not fit at every point. It splits the x range into a k-d tree (in one
//! dimension: intervals), fits the local quadratic only at the cell boundaries (vertices), keeping
//! the value and the slope there, and evaluates each point by cubic Hermite interpolation inside
//! its cell. The result differs from a local fit at each point ("direct") by up to a few 1e-3 in
//! log10 variance, enough to move genes across scanpy's top-n cut, so the tree is reproduced here
//! step for step (`lowesd`, `lowesb` → `ehg131`, `ehg126`, `ehg124`, `ehg139`/`ehg127`, and
//! `lowese` → `ehg128` in `loessf.f`).
//!
//! scikit-misc turns every warning of the Fortran code into an error (its `ehg182`/`ehg183`/`ehg184`
//! set `error_status`), so a local fit that needs a pseudoinverse — a neighbourhood with fewer than
//! three distinct x values, common for genes with one or two UMIs in a small data set — makes
//! scanpy fail. This port fails there too rather than return numbers scanpy never produces.

use anyhow::{bail, Result};

/// Local polynomial terms for degree 2 in one predictor: 1, (x - q), (x - q)^2.
const K: usize = 3;

/// The fitted values at `x` of a degree-2 LOESS of `y` on `x` with the given span, as
/// `skmisc.loess.loess(x, y, span=span, degree=2).fit()` then `outputs.fitted_values`.
pub(crate) fn fitted_values(x: &[f64], y: &[f64], span: f64) -> Result<Vec<f64>> {
    let n = x.len();
    if y.len() != n {
        bail!("loess: {} x values but {} y values", n, y.len());
    }
    if let Some(v) = x.iter().chain(y).find(|v| !v.is_finite()) {
        bail!("loess: non-finite input value {v}");
    }
    if span.is_nan() || span <= 0.0 {
        bail!("loess: span must be positive, got {span}");
    }
    // loess_workspace: nf = min(n, floor(n * span + 1e-5)) points in each neighbourhood.
    let nf = n.min((n as f64 * span + 1e-5).floor() as usize);
    if nf == 0 {
        bail!("loess: span {span} is too small for {n} points");
    }
    // ehg139: error 104 "span too small. fewer data values than degrees of freedom."
    if K > nf - 1 {
        bail!("loess: span {span} leaves {nf} points per neighbourhood for {n} points; a local quadratic needs at least {}", K + 1);
    }
    let tree = KdTree::build(x, span)?;
    let mut slope_at = Vec::with_capacity(tree.vertices.len());
    let mut dist = vec![0f64; n];
    let mut order: Vec<usize> = (0..n).collect();
    for &q in &tree.vertices {
        slope_at.push(local_fit(x, y, q, nf, span, &mut dist, &mut order)?);
    }
    Ok(x.iter().map(|&z| tree.interpolate(z, &slope_at)).collect())
}

/// The k-d tree of `ehg126`/`ehg124` in one dimension: cells are intervals between vertices.
struct KdTree {
    /// Vertex positions; 0 and 1 are the bounding box, the rest split values in creation order.
    vertices: Vec<f64>,
    cells: Vec<Cell>,
}

struct Cell {
    lo_vertex: usize,
    hi_vertex: usize,
    /// `Some((split value, left child, right child))` for an inner cell.
    split: Option<(f64, usize, usize)>,
}

impl KdTree {
    fn build(x: &[f64], span: f64) -> Result<Self> {
        let n = x.len();
        // ehg126: the bounding box, widened by 0.5% of the range on each side.
        let (alpha, beta) = x.iter().fold((f64::MAX, -f64::MAX), |(a, b), &t| (a.min(t), b.max(t)));
        let mu = 0.005 * (beta - alpha).max(1e-10 * alpha.abs().max(beta.abs()) + 1e-30);
        let mut vertices = vec![alpha - mu, beta + mu];

        // lowesb passes fc = floor(n * f * cell) (cell = 0.2, the loess default, multiplied by the
        // span in loess_raw) as the most points a leaf may hold; fd = 0 (no minimum width).
        let fc = (n as f64 * (span * 0.2)).floor() as usize;
        let fd = 0.0;
        let nvmax = n.max(200); // loess_workspace: nvmax = max(200, n), ncmax = nvmax
        let ncmax = nvmax;

        // The tree depends only on the order statistics of x: ehg106's partial sorts put exactly
        // the order statistics l..=m in the left son, so cells are ranges of the sorted values.
        let mut xs = x.to_vec();
        xs.sort_by(f64::total_cmp);

        let mut cells = vec![Cell { lo_vertex: 0, hi_vertex: 1, split: None }];
        let mut ranges = vec![(0usize, n - 1)];
        let mut p = 0;
        while p < cells.len() {
            let (l, u) = ranges[p];
            let (vlo, vhi) = (vertices[cells[p].lo_vertex], vertices[cells[p].hi_vertex]);
            let diam = (vhi - vlo).abs();
            let mut leaf = u - l < fc // (u - l + 1) <= fc points
                || diam <= fd
                || ncmax < cells.len() + 2
                || (nvmax as f64) < vertices.len() as f64 + 1.0; // nv + vc/2 with vc = 2
            let mut m = (l + u) / 2; // int((l+u)/2) in 1-based indices, shifted to 0-based
            if !leaf {
                // "All ties go with hi son": move the cut to the nearest gap between distinct
                // values, trying m, m+1, m-1, m+2, ... (btyner's 2006 fix); give up at either end.
                let mut offset: isize = 0;
                loop {
                    let at = m as isize + offset;
                    if at >= u as isize || at < l as isize {
                        break;
                    }
                    let at = at as usize;
                    if xs[at] == xs[at + 1] {
                        offset = -offset;
                        if offset >= 0 {
                            offset += 1;
                        }
                    } else {
                        m = at;
                        break;
                    }
                }
                let xi = xs[m];
                leaf = xi == vlo || xi == vhi;
                if !leaf {
                    // ehg125: the new vertex; in one dimension it never repeats an existing one,
                    // since it lies strictly inside its cell.
                    let v = vertices.len();
                    vertices.push(xi);
                    let (left, right) = (cells.len(), cells.len() + 1);
                    cells.push(Cell { lo_vertex: cells[p].lo_vertex, hi_vertex: v, split: None });
                    ranges.push((l, m));
                    cells.push(Cell { lo_vertex: v, hi_vertex: cells[p].hi_vertex, split: None });
                    ranges.push((m + 1, u));
                    cells[p].split = Some((xi, left, right));
                }
            }
            p += 1;
        }
        // lowesb's memory warnings, which scikit-misc raises as errors.
        if (nvmax as f64) < vertices.len() as f64 + 1.0 {
            bail!("loess: k-d tree limited by memory; nvmax={nvmax}");
        }
        if ncmax < cells.len() + 2 {
            bail!("loess: k-d tree limited by memory. ncmax={ncmax}");
        }
        Ok(KdTree { vertices, cells })
    }

    /// ehg128 in one dimension: descend to the leaf holding z (z <= split goes left), then cubic
    /// Hermite interpolation between the vertex values and slopes.
    fn interpolate(&self, z: f64, fit: &[(f64, f64)]) -> f64 {
        let mut j = 0;
        while let Some((xi, lo, hi)) = self.cells[j].split {
            j = if z <= xi { lo } else { hi };
        }
        let (ll, ur) = (self.cells[j].lo_vertex, self.cells[j].hi_vertex);
        let (v0, v1) = (self.vertices[ll], self.vertices[ur]);
        let h = (z - v0) / (v1 - v0);
        let phi0 = (1.0 - h) * (1.0 - h) * (1.0 + 2.0 * h);
        let phi1 = h * h * (3.0 - 2.0 * h);
        let psi0 = h * (1.0 - h) * (1.0 - h);
        let psi1 = h * h * (h - 1.0);
        phi0 * fit[ll].0 + phi1 * fit[ur].0 + (psi0 * fit[ll].1 + psi1 * fit[ur].1) * (v1 - v0)
    }
}

/// ehg127: the local quadratic at `q` from its `nf` nearest points with tricube weights, by
/// column equilibration, QR and an SVD of R. Returns (value, slope) at q. `dist` and `order` are
/// scratch space of length n.
fn local_fit(x: &[f64], y: &[f64], q: f64, nf: usize, span: f64, dist: &mut [f64], order: &mut [usize]) -> Result<(f64, f64)> {
    for (d, &xi) in dist.iter_mut().zip(x) {
        *d = (xi - q) * (xi - q);
    }
    // The nf nearest points: which of several equidistant points at the edge are taken does not
    // matter, the edge point's weight is zero.
    order.select_nth_unstable_by(nf - 1, |&a, &b| dist[a].total_cmp(&dist[b]));
    let near = &order[..nf];
    let rho = dist[near[nf - 1]] * span.max(1.0); // squared radius
    if rho <= 0.0 {
        bail!("loess: zero-width neighbourhood at x = {q}; make span bigger");
    }
    // Rows sqrt(w) * [1, (x - q), (x - q)^2] with w the tricube weight (1 - (d/rho)^3)^3.
    let mut b = vec![[0f64; K]; nf];
    let mut eta = vec![0f64; nf];
    let mut any_weight = false;
    for (r, &i) in near.iter().enumerate() {
        let t = (dist[i] / rho).sqrt();
        let c = 1.0 - t * t * t;
        let w = (c * c * c).sqrt();
        any_weight |= w != 0.0;
        let dx = x[i] - q;
        b[r] = [w, w * dx, w * (dx * dx)];
        eta[r] = w * y[i];
    }
    if !any_weight {
        bail!("loess: all data on the boundary of the neighbourhood at x = {q}; make span bigger");
    }
    // Equilibrate the columns to unit length (a zero column is left alone).
    let mut colnorm = [1f64; K];
    for (j, cn) in colnorm.iter_mut().enumerate() {
        let s = b.iter().map(|row| row[j] * row[j]).sum::<f64>().sqrt();
        if s > 0.0 {
            for row in b.iter_mut() {
                row[j] /= s;
            }
            *cn = s;
        }
    }
    let (r, qty) = householder_qr(&mut b, &mut eta);
    let (u, sigma, v) = jacobi_svd(r);
    // dloess uses the pseudoinverse when the smallest singular value is at most 100 machine
    // epsilons of the largest, and says so; scikit-misc makes that message an error.
    let smax = sigma.iter().copied().fold(0.0, f64::max);
    let smin = sigma.iter().copied().fold(f64::INFINITY, f64::min);
    let tol = smax * (100.0 * f64::EPSILON);
    if smin <= tol {
        bail!(
            "loess: the local quadratic at x = {q} needs a pseudoinverse (reciprocal condition number \
             {:.4e}): its neighbourhood holds too few distinct x values. scanpy's seurat_v3 fails on the \
             same input (scikit-misc raises); filter out rarely detected genes first or use another flavor",
            if smax > 0.0 { smin / smax } else { 0.0 }
        );
    }
    // coef = V diag(1/sigma) U^T Q^T eta, then undo the equilibration.
    let mut gamma = [0f64; K];
    for j in 0..K {
        gamma[j] = (0..K).map(|i| u[i][j] * qty[i]).sum::<f64>() / sigma[j];
    }
    let coef = |i: usize| (0..K).map(|j| v[i][j] * gamma[j]).sum::<f64>() / colnorm[i];
    Ok((coef(0), coef(1)))
}

/// Householder QR of the n × K matrix `b` (rows), applied to `eta` as well. Returns R (K × K,
/// upper triangular) and the first K entries of Q^T eta.
fn householder_qr(b: &mut [[f64; K]], eta: &mut [f64]) -> ([[f64; K]; K], [f64; K]) {
    let n = b.len();
    for l in 0..K.min(n) {
        let norm = (l..n).map(|i| b[i][l] * b[i][l]).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        // LINPACK dqrdc's reflection: scale the column by ±1/norm (sign of the diagonal), add 1
        // to the diagonal, and reflect the remaining columns and the right-hand side.
        let nrm = if b[l][l] < 0.0 { -norm } else { norm };
        let scale = 1.0 / nrm;
        for row in b[l..].iter_mut() {
            row[l] *= scale;
        }
        b[l][l] += 1.0;
        let pivot = b[l][l];
        for j in l + 1..K {
            let t = -(l..n).map(|i| b[i][l] * b[i][j]).sum::<f64>() / pivot;
            for row in b[l..].iter_mut() {
                row[j] += t * row[l];
            }
        }
        let t = -(l..n).map(|i| b[i][l] * eta[i]).sum::<f64>() / pivot;
        for (row, e) in b[l..].iter().zip(eta[l..].iter_mut()) {
            *e += t * row[l];
        }
        b[l][l] = -nrm;
    }
    let mut r = [[0f64; K]; K];
    let mut qty = [0f64; K];
    for i in 0..K.min(n) {
        for j in i..K {
            r[i][j] = b[i][j];
        }
        qty[i] = eta[i];
    }
    (r, qty)
}

/// One-sided Jacobi SVD of a K × K matrix: A = U diag(sigma) V^T. Jacobi keeps small singular
/// values accurate relative to themselves, which the singularity test above needs.
fn jacobi_svd(a: [[f64; K]; K]) -> ([[f64; K]; K], [f64; K], [[f64; K]; K]) {
    let mut a = a;
    let mut v = [[0f64; K]; K];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..K {
            for q in p + 1..K {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for row in &a {
                    alpha += row[p] * row[p];
                    beta += row[q] * row[q];
                    gamma += row[p] * row[q];
                }
                if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for row in a.iter_mut().chain(v.iter_mut()) {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut sigma = [0f64; K];
    let mut u = [[0f64; K]; K];
    for j in 0..K {
        sigma[j] = a.iter().map(|row| row[j] * row[j]).sum::<f64>().sqrt();
        if sigma[j] > 0.0 {
            for i in 0..K {
                u[i][j] = a[i][j] / sigma[j];
            }
        }
    }
    (u, sigma, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_a_quadratic_exactly() {
        // A local quadratic fit reproduces a global quadratic at every vertex (value and slope),
        // and Hermite interpolation of a quadratic from exact values and slopes is exact.
        let x: Vec<f64> = (0..400).map(|i| (i as f64 * 0.37).sin() * 3.0 + i as f64 * 0.01).collect();
        let f = |t: f64| 0.5 * t * t - 2.0 * t + 1.0;
        let y: Vec<f64> = x.iter().map(|&t| f(t)).collect();
        let fit = fitted_values(&x, &y, 0.3).unwrap();
        for (a, b) in fit.iter().zip(&y) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }

    #[test]
    fn tree_cells_respect_fc_and_ties() {
        // 1,000 points, fc = floor(1000 * 0.06) = 60: every leaf holds at most 60 points.
        let x: Vec<f64> = (0..1000).map(|i| ((i * 7919) % 1000) as f64 / 10.0).collect();
        let t = KdTree::build(&x, 0.3).unwrap();
        let mut xs = x.clone();
        xs.sort_by(f64::total_cmp);
        for c in t.cells.iter().filter(|c| c.split.is_none()) {
            let (lo, hi) = (t.vertices[c.lo_vertex], t.vertices[c.hi_vertex]);
            let inside = xs.iter().filter(|&&v| v > lo && v <= hi).count();
            assert!(inside <= 60, "leaf ({lo}, {hi}] holds {inside} points");
        }
        // Heavy ties: 900 copies of one value and 100 others. The split moves off the tie.
        let mut x2 = vec![1.0; 900];
        x2.extend((0..100).map(|i| 2.0 + i as f64));
        let t2 = KdTree::build(&x2, 0.3).unwrap();
        let (xi, _, _) = t2.cells[0].split.unwrap();
        assert_eq!(xi, 1.0, "the first cut sits at the end of the tied run");
    }

    #[test]
    fn singular_neighbourhood_is_an_error() {
        // Two distinct x values: a quadratic is not determined anywhere.
        let x: Vec<f64> = (0..100).map(|i| (i % 2) as f64).collect();
        let y: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let e = fitted_values(&x, &y, 0.9).unwrap_err().to_string();
        assert!(e.contains("pseudoinverse"), "{e}");
        // With span 0.3 the 30 nearest points of the outer vertices all lie at one distance.
        let e = fitted_values(&x, &y, 0.3).unwrap_err().to_string();
        assert!(e.contains("boundary"), "{e}");
        assert!(fitted_values(&x[..10], &y[..10], 0.3).is_err(), "3 points per neighbourhood is too few");
    }

    #[test]
    fn svd_of_triangular() {
        let r = [[3.0, 1.0, 0.5], [0.0, 2.0, -1.0], [0.0, 0.0, 1e-3]];
        let (u, s, v) = jacobi_svd(r);
        for i in 0..K {
            for j in 0..K {
                let a: f64 = (0..K).map(|k| u[i][k] * s[k] * v[j][k]).sum();
                assert!((a - r[i][j]).abs() < 1e-13);
            }
        }
        // det = 3 * 2 * 1e-3 = product of the singular values
        assert!((s.iter().product::<f64>() - 6e-3).abs() < 1e-15);
    }
}
