//! scikit-learn's `LogisticRegression()` defaults: L2 penalty with C = 1 on the weights (not
//! the intercepts), softmax over all classes when there are more than two, the binary logistic
//! model when there are two (sklearn fits one weight vector then, which is penalised
//! differently from a symmetric two-class softmax). Solved by full-batch L-BFGS on the
//! mean loss, the objective sklearn minimises (same minimiser as the summed form).

use std::collections::VecDeque;

use anyhow::{bail, Result};
use ndarray::{Array1, Array2, ArrayView2, Axis};

#[derive(Debug, Clone)]
pub struct LogRegOptions {
    /// Inverse regularisation strength (sklearn's C).
    pub c: f64,
    pub max_iter: usize,
    /// Stop when the largest gradient entry of the mean loss is below this.
    pub tol: f64,
}

impl Default for LogRegOptions {
    fn default() -> Self {
        // Tighter than sklearn's 1e-4 so that the result is the optimum, not a solver artefact.
        LogRegOptions { c: 1.0, max_iter: 1000, tol: 1e-8 }
    }
}

#[derive(Debug, Clone)]
pub struct LogisticRegression {
    /// Classes × features; in the binary case row 0 is fixed at zero.
    pub weights: Array2<f64>,
    pub intercepts: Array1<f64>,
    pub iterations: usize,
    pub converged: bool,
}

/// Which class rows carry parameters: all of them, or only class 1 in the binary model.
fn free_rows(k: usize) -> std::ops::Range<usize> {
    if k == 2 {
        1..2
    } else {
        0..k
    }
}

struct Problem<'a> {
    x: ArrayView2<'a, f64>,
    y: &'a [usize],
    k: usize,
    l2: f64,
}

impl Problem<'_> {
    fn unpack(&self, theta: &[f64]) -> (Array2<f64>, Array1<f64>) {
        let d = self.x.ncols();
        let rows = free_rows(self.k);
        let mut w = Array2::<f64>::zeros((self.k, d));
        let mut b = Array1::<f64>::zeros(self.k);
        for (r, c) in rows.clone().enumerate() {
            w.row_mut(c).assign(&ndarray::ArrayView1::from(&theta[r * d..(r + 1) * d]));
            b[c] = theta[rows.len() * d + r];
        }
        (w, b)
    }

    /// Mean cross-entropy + l2/2 ‖W‖² and its gradient.
    fn eval(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let (n, d) = self.x.dim();
        let (w, b) = self.unpack(theta);
        let mut p = self.x.dot(&w.t()) + &b;
        let mut loss = 0.0;
        for (i, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
            let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            loss += m + z.ln() - row[self.y[i]];
            row.mapv_inplace(|v| (v - m).exp() / z);
            row[self.y[i]] -= 1.0;
        }
        let nf = n as f64;
        let gw = p.t().dot(&self.x) / nf + &(&w * self.l2);
        let gb = p.sum_axis(Axis(0)) / nf;
        let rows = free_rows(self.k);
        let mut grad = vec![0f64; theta.len()];
        for (r, c) in rows.clone().enumerate() {
            grad[r * d..(r + 1) * d].copy_from_slice(gw.row(c).as_slice().unwrap_or(&gw.row(c).to_vec()));
            grad[rows.len() * d + r] = gb[c];
        }
        let penalty = 0.5 * self.l2 * w.iter().map(|v| v * v).sum::<f64>();
        (loss / nf + penalty, grad)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl LogisticRegression {
    /// Fits on rows of `x` with class indices `y` in 0..`n_classes`.
    pub fn fit(x: ArrayView2<f64>, y: &[usize], n_classes: usize, opts: &LogRegOptions) -> Result<Self> {
        let (n, d) = x.dim();
        if n != y.len() || n == 0 {
            bail!("logistic regression: {n} rows but {} labels", y.len());
        }
        if n_classes < 2 {
            bail!("logistic regression needs at least two classes in the training labels");
        }
        if let Some(bad) = y.iter().find(|&&c| c >= n_classes) {
            bail!("logistic regression: class index {bad} out of range for {n_classes} classes");
        }
        let prob = Problem { x, y, k: n_classes, l2: 1.0 / (opts.c * n as f64) };
        let dim = free_rows(n_classes).len() * (d + 1);
        let mut theta = vec![0f64; dim];
        let (mut f, mut g) = prob.eval(&theta);
        let mut hist: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::new();
        const MEMORY: usize = 10;
        let mut converged = false;
        let mut iterations = 0;
        while iterations < opts.max_iter {
            if g.iter().fold(0f64, |a, v| a.max(v.abs())) <= opts.tol {
                converged = true;
                break;
            }
            iterations += 1;
            // Two-loop recursion for the quasi-Newton direction.
            let mut q = g.clone();
            let mut alphas = Vec::with_capacity(hist.len());
            for (s, yv, rho) in hist.iter().rev() {
                let a = rho * dot(s, &q);
                q.iter_mut().zip(yv).for_each(|(qi, yi)| *qi -= a * yi);
                alphas.push(a);
            }
            let gamma = hist.back().map(|(s, yv, _)| dot(s, yv) / dot(yv, yv)).unwrap_or(1.0);
            q.iter_mut().for_each(|v| *v *= gamma);
            for ((s, yv, rho), a) in hist.iter().zip(alphas.iter().rev()) {
                let bcoef = rho * dot(yv, &q);
                q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - bcoef) * si);
            }
            let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
            let mut slope = dot(&g, &dir);
            if slope >= 0.0 {
                hist.clear();
                dir = g.iter().map(|v| -v).collect();
                slope = dot(&g, &dir);
            }
            // Backtracking (Armijo); the first step is scaled when there is no curvature yet.
            let mut step = if hist.is_empty() { (1.0 / dot(&g, &g).sqrt()).min(1.0) } else { 1.0 };
            let mut accepted = None;
            for _ in 0..60 {
                let trial: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
                let (ft, gt) = prob.eval(&trial);
                if ft.is_finite() && ft <= f + 1e-4 * step * slope {
                    accepted = Some((trial, ft, gt));
                    break;
                }
                step *= 0.5;
            }
            let Some((trial, ft, gt)) = accepted else { break };
            let s: Vec<f64> = trial.iter().zip(&theta).map(|(a, b)| a - b).collect();
            let yv: Vec<f64> = gt.iter().zip(&g).map(|(a, b)| a - b).collect();
            let sy = dot(&s, &yv);
            if sy > 1e-300 {
                if hist.len() == MEMORY {
                    hist.pop_front();
                }
                hist.push_back((s, yv, 1.0 / sy));
            }
            let done = (f - ft).abs() <= 1e-16 * f.abs().max(1.0);
            theta = trial;
            f = ft;
            g = gt;
            if done {
                converged = g.iter().fold(0f64, |a, v| a.max(v.abs())) <= opts.tol.max(1e-6);
                break;
            }
        }
        let (weights, intercepts) = prob.unpack(&theta);
        Ok(LogisticRegression { weights, intercepts, iterations, converged })
    }

    /// Class probabilities, cells × classes.
    pub fn predict_proba(&self, x: ArrayView2<f64>) -> Array2<f64> {
        let mut p = x.dot(&self.weights.t()) + &self.intercepts;
        for mut row in p.axis_iter_mut(Axis(0)) {
            let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            row.mapv_inplace(|v| (v - m).exp());
            let z = row.sum();
            row.mapv_inplace(|v| v / z);
        }
        p
    }
}

/// Index of the largest entry; the first on ties (numpy's argmax).
pub fn argmax(row: ndarray::ArrayView1<f64>) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn gradient_is_zero_at_the_optimum_and_matches_finite_differences() {
        let x = array![[0.0, 1.0], [1.0, 0.5], [2.0, -1.0], [3.0, 0.0], [0.5, 2.0], [2.5, 2.5]];
        let y = [0, 0, 1, 1, 2, 2];
        let prob = Problem { x: x.view(), y: &y, k: 3, l2: 0.1 };
        let theta: Vec<f64> = (0..9).map(|i| 0.1 * i as f64 - 0.3).collect();
        let (_, g) = prob.eval(&theta);
        for i in 0..theta.len() {
            let (mut a, mut b) = (theta.clone(), theta.clone());
            a[i] += 1e-6;
            b[i] -= 1e-6;
            let fd = (prob.eval(&a).0 - prob.eval(&b).0) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-7, "{i}: {fd} vs {}", g[i]);
        }
        let m = LogisticRegression::fit(x.view(), &y, 3, &LogRegOptions::default()).unwrap();
        assert!(m.converged);
        let p = m.predict_proba(x.view());
        for r in p.rows() {
            assert!((r.sum() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn binary_matches_sklearn() {
        // sklearn 1.9.1: LogisticRegression(tol=1e-10).fit([[0],[1],[2],[3]], [0,0,1,1]):
        // the binary model, the penalty on one weight vector.
        let x = array![[0.0], [1.0], [2.0], [3.0]];
        let m = LogisticRegression::fit(x.view(), &[0, 0, 1, 1], 2, &LogRegOptions::default()).unwrap();
        assert!((m.weights[[1, 0]] - 0.95828595).abs() < 1e-6, "{}", m.weights[[1, 0]]);
        assert!((m.intercepts[1] + 1.43742892).abs() < 1e-6, "{}", m.intercepts[1]);
        assert_eq!(m.weights[[0, 0]], 0.0);
    }

    #[test]
    fn multinomial_matches_sklearn() {
        // sklearn 1.9.1, LogisticRegression(tol=1e-10) on the data of the gradient test.
        let x = array![[0.0, 1.0], [1.0, 0.5], [2.0, -1.0], [3.0, 0.0], [0.5, 2.0], [2.5, 2.5]];
        let m = LogisticRegression::fit(x.view(), &[0, 0, 1, 1, 2, 2], 3, &LogRegOptions::default()).unwrap();
        let coef = array![[-0.65582185, -0.20085006], [0.61085379, -0.72706612], [0.04496806, 0.92791618]];
        let intercept = array![1.32028346, -0.45461366, -0.8656698];
        assert!((&m.weights - &coef).iter().all(|v| v.abs() < 1e-6), "{}", m.weights);
        assert!((&m.intercepts - &intercept).iter().all(|v| v.abs() < 1e-6), "{}", m.intercepts);
    }
}
