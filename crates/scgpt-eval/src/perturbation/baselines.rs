//! Baselines a perturbation model has to beat, each giving μ̂ for a test condition so that the
//! same metrics apply (`None` where a baseline does not cover the condition):
//! - `no_change`: the control mean m (its deltas are zero, so the delta metrics are undefined);
//! - `train_mean`: the mean over all cells of the training perturbations (controls excluded);
//! - `additive`: m + Σ (μ_single − m) over the double's two genes, only when both singles are
//!   training conditions;
//! - `linear`: ridge regression from a gene's embedding to its single-gene delta μ_single − m,
//!   fitted on the training singles; a double gets the sum of its two predicted deltas. Features
//!   are standardised with the training singles' mean and population SD (a constant feature keeps
//!   scale 1, as scikit-learn's `StandardScaler`, and gets weight 0), the targets centred, the
//!   intercept not penalised: `make_pipeline(StandardScaler(), Ridge(alpha=λ))`, λ = 1 by
//!   default. Standardising makes λ mean the same for any embedding scale.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::condition::Condition;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    NoChange,
    TrainMean,
    Additive,
    Linear,
}

impl BaselineKind {
    pub const ALL: [BaselineKind; 4] = [BaselineKind::NoChange, BaselineKind::TrainMean, BaselineKind::Additive, BaselineKind::Linear];

    pub fn name(self) -> &'static str {
        match self {
            BaselineKind::NoChange => "no_change",
            BaselineKind::TrainMean => "train_mean",
            BaselineKind::Additive => "additive",
            BaselineKind::Linear => "linear",
        }
    }
}

/// A training condition's true mean over the genes, and its number of cells.
#[derive(Debug, Clone)]
pub struct TrainingCondition<'a> {
    pub condition: Condition,
    pub mean: &'a [f64],
    pub n_cells: usize,
}

/// One vector per gene symbol (e.g. a model's gene embeddings), row-major.
#[derive(Debug, Clone)]
pub struct GeneEmbeddings {
    dim: usize,
    values: Vec<f32>,
    index: HashMap<String, usize>,
}

impl GeneEmbeddings {
    pub fn from_rows(genes: Vec<String>, rows: Vec<Vec<f32>>) -> Result<Self> {
        let dim = rows.first().map_or(0, |r| r.len());
        if let Some(i) = rows.iter().position(|r| r.len() != dim) {
            bail!("gene embeddings: row {i} ({:?}) has {} values, the first has {dim}", genes.get(i), rows[i].len());
        }
        Self::from_row_major(genes, dim, rows.concat())
    }

    pub fn from_row_major(genes: Vec<String>, dim: usize, values: Vec<f32>) -> Result<Self> {
        ensure!(dim > 0, "gene embeddings need at least one dimension");
        ensure!(
            values.len() == genes.len() * dim,
            "gene embeddings: {} genes × {dim} dimensions need {} values, got {}",
            genes.len(),
            genes.len() * dim,
            values.len()
        );
        if let Some(k) = values.iter().position(|v| !v.is_finite()) {
            bail!("gene embeddings: the vector of {:?} is not finite", genes[k / dim]);
        }
        let mut index = HashMap::new();
        for (i, g) in genes.into_iter().enumerate() {
            if index.insert(g.clone(), i).is_some() {
                bail!("gene embeddings: {g:?} appears twice");
            }
        }
        Ok(GeneEmbeddings { dim, values, index })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn get(&self, gene: &str) -> Option<&[f32]> {
        self.index.get(gene).map(|&i| &self.values[i * self.dim..(i + 1) * self.dim])
    }
}

#[derive(Debug, Clone)]
pub struct LinearOptions {
    pub lambda: f64,
}

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions { lambda: 1.0 }
    }
}

fn check_means(control_mean: &[f64], train: &[TrainingCondition]) -> Result<()> {
    for t in train {
        let name = t.condition.to_gears_string();
        ensure!(
            t.mean.len() == control_mean.len(),
            "training condition {name}: its mean has {} genes, the control mean {}",
            t.mean.len(),
            control_mean.len()
        );
        if let Some(j) = t.mean.iter().position(|v| !v.is_finite()) {
            bail!("training condition {name}: its mean is {} at gene {j}; the data must be finite", t.mean[j]);
        }
    }
    Ok(())
}

/// Training singles by gene, with their delta μ − m.
fn single_deltas(control_mean: &[f64], train: &[TrainingCondition]) -> Result<HashMap<String, Vec<f64>>> {
    check_means(control_mean, train)?;
    let mut out: HashMap<String, Vec<f64>> = HashMap::new();
    for t in train {
        if let Condition::Single(g) = &t.condition {
            let delta = t.mean.iter().zip(control_mean).map(|(a, b)| a - b).collect();
            if out.insert(g.clone(), delta).is_some() {
                bail!("gene {g:?} has two single conditions among the training conditions (e.g. {g}+ctrl and ctrl+{g}); merge them first");
            }
        }
    }
    Ok(out)
}

pub fn no_change(control_mean: &[f64], test: &[Condition]) -> Vec<Option<Vec<f64>>> {
    test.iter().map(|_| Some(control_mean.to_vec())).collect()
}

/// The cell-weighted mean of the training perturbations, for every test condition.
pub fn train_mean(train: &[TrainingCondition], test: &[Condition]) -> Result<Vec<Option<Vec<f64>>>> {
    let perturbed: Vec<&TrainingCondition> = train.iter().filter(|t| !t.condition.is_control()).collect();
    if let Some(first) = perturbed.first() {
        check_means(first.mean, train)?;
    }
    let n: usize = perturbed.iter().map(|t| t.n_cells).sum();
    ensure!(n > 0, "train_mean needs training perturbations with cells; the training list has none");
    let g = perturbed[0].mean.len();
    let mut sum = vec![0.0; g];
    for t in &perturbed {
        for (s, v) in sum.iter_mut().zip(t.mean) {
            *s += v * t.n_cells as f64;
        }
    }
    let mean: Vec<f64> = sum.into_iter().map(|s| s / n as f64).collect();
    Ok(test.iter().map(|_| Some(mean.clone())).collect())
}

pub fn additive(control_mean: &[f64], train: &[TrainingCondition], test: &[Condition]) -> Result<Vec<Option<Vec<f64>>>> {
    let deltas = single_deltas(control_mean, train)?;
    Ok(test
        .iter()
        .map(|c| match c {
            Condition::Double(a, b) => match (deltas.get(a), deltas.get(b)) {
                (Some(da), Some(db)) => Some(control_mean.iter().zip(da).zip(db).map(|((m, x), y)| m + x + y).collect()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// A fitted ridge map from a gene's embedding to its single-gene delta.
#[derive(Debug, Clone)]
pub struct LinearDeltaModel {
    x_mean: Vec<f64>,
    x_scale: Vec<f64>,
    y_mean: Vec<f64>,
    /// dim × genes, row-major.
    weights: Vec<f64>,
    n_genes: usize,
}

impl LinearDeltaModel {
    /// Fits on `(embedding, delta)` pairs; `lambda` > 0.
    pub fn fit(x: &[&[f32]], y: &[Vec<f64>], lambda: f64) -> Result<Self> {
        ensure!(lambda.is_finite() && lambda > 0.0, "linear baseline: lambda = {lambda} must be a finite number > 0");
        ensure!(!x.is_empty() && x.len() == y.len(), "linear baseline: no training single has an embedding");
        let (n, d, g) = (x.len(), x[0].len(), y[0].len());
        ensure!(d > 0 && x.iter().all(|r| r.len() == d), "linear baseline: the embeddings differ in length");
        ensure!(y.iter().all(|r| r.len() == g), "linear baseline: the deltas differ in length");
        let nf = n as f64;
        let x_mean: Vec<f64> = (0..d).map(|k| x.iter().map(|r| r[k] as f64).sum::<f64>() / nf).collect();
        let x_scale: Vec<f64> = (0..d)
            .map(|k| {
                let var = x.iter().map(|r| (r[k] as f64 - x_mean[k]).powi(2)).sum::<f64>() / nf;
                if var > 0.0 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        let z: Vec<f64> = x.iter().flat_map(|r| (0..d).map(|k| (r[k] as f64 - x_mean[k]) / x_scale[k]).collect::<Vec<_>>()).collect();
        let y_mean: Vec<f64> = (0..g).map(|j| y.iter().map(|r| r[j]).sum::<f64>() / nf).collect();
        let yc: Vec<f64> = y.iter().flat_map(|r| r.iter().zip(&y_mean).map(|(a, b)| a - b).collect::<Vec<_>>()).collect();
        let weights = ridge_weights(&z, &yc, n, d, g, lambda, d > n)?;
        Ok(LinearDeltaModel { x_mean, x_scale, y_mean, weights, n_genes: g })
    }

    pub fn predict_delta(&self, embedding: &[f32]) -> Result<Vec<f64>> {
        ensure!(
            embedding.len() == self.x_mean.len(),
            "linear baseline: an embedding of {} values for a model fitted on {}",
            embedding.len(),
            self.x_mean.len()
        );
        let mut out = self.y_mean.clone();
        for (k, &e) in embedding.iter().enumerate() {
            let z = (e as f64 - self.x_mean[k]) / self.x_scale[k];
            let w = &self.weights[k * self.n_genes..(k + 1) * self.n_genes];
            for (o, wj) in out.iter_mut().zip(w) {
                *o += z * wj;
            }
        }
        Ok(out)
    }
}

/// W (d × g) minimising ‖Z W − Y‖² + λ‖W‖², through the d × d normal equations or, when there
/// are fewer samples than features, the n × n dual W = Zᵀ (Z Zᵀ + λI)⁻¹ Y.
pub(crate) fn ridge_weights(z: &[f64], y: &[f64], n: usize, d: usize, g: usize, lambda: f64, dual: bool) -> Result<Vec<f64>> {
    let zt = |i: usize, k: usize| z[i * d + k];
    if dual {
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..d).map(|k| zt(i, k) * zt(j, k)).sum::<f64>() + if i == j { lambda } else { 0.0 };
            }
        }
        let mut alpha = y.to_vec();
        cholesky_solve(&mut a, n, &mut alpha, g)?;
        let mut w = vec![0.0; d * g];
        for i in 0..n {
            for k in 0..d {
                let zik = zt(i, k);
                for j in 0..g {
                    w[k * g + j] += zik * alpha[i * g + j];
                }
            }
        }
        Ok(w)
    } else {
        let mut a = vec![0.0; d * d];
        let mut b = vec![0.0; d * g];
        for i in 0..n {
            for k in 0..d {
                for l in 0..d {
                    a[k * d + l] += zt(i, k) * zt(i, l);
                }
                for j in 0..g {
                    b[k * g + j] += zt(i, k) * y[i * g + j];
                }
            }
        }
        for k in 0..d {
            a[k * d + k] += lambda;
        }
        cholesky_solve(&mut a, d, &mut b, g)?;
        Ok(b)
    }
}

/// Solves A X = B in place (A k × k symmetric positive definite, B k × g row-major).
fn cholesky_solve(a: &mut [f64], k: usize, b: &mut [f64], g: usize) -> Result<()> {
    for j in 0..k {
        let mut diag = a[j * k + j];
        for p in 0..j {
            diag -= a[j * k + p] * a[j * k + p];
        }
        ensure!(
            diag > 0.0 && diag.is_finite(),
            "linear baseline: the ridge system is not positive definite (non-finite embeddings or deltas?)"
        );
        let l = diag.sqrt();
        a[j * k + j] = l;
        for i in j + 1..k {
            let mut s = a[i * k + j];
            for p in 0..j {
                s -= a[i * k + p] * a[j * k + p];
            }
            a[i * k + j] = s / l;
        }
    }
    for i in 0..k {
        for p in 0..i {
            let f = a[i * k + p];
            for c in 0..g {
                b[i * g + c] -= f * b[p * g + c];
            }
        }
        let l = a[i * k + i];
        b[i * g..(i + 1) * g].iter_mut().for_each(|v| *v /= l);
    }
    for i in (0..k).rev() {
        for p in i + 1..k {
            let f = a[p * k + i];
            for c in 0..g {
                b[i * g + c] -= f * b[p * g + c];
            }
        }
        let l = a[i * k + i];
        b[i * g..(i + 1) * g].iter_mut().for_each(|v| *v /= l);
    }
    Ok(())
}

pub fn linear(
    control_mean: &[f64],
    train: &[TrainingCondition],
    test: &[Condition],
    embeddings: &GeneEmbeddings,
    opts: &LinearOptions,
) -> Result<Vec<Option<Vec<f64>>>> {
    let deltas = single_deltas(control_mean, train)?;
    let mut genes: Vec<&String> = deltas.keys().filter(|g| embeddings.get(g).is_some()).collect();
    genes.sort();
    ensure!(
        !genes.is_empty(),
        "linear baseline: none of the {} training singles has a gene embedding; check that the embeddings use the screen's gene symbols",
        deltas.len()
    );
    let x: Vec<&[f32]> = genes.iter().map(|g| embeddings.get(g).expect("filtered above")).collect();
    let y: Vec<Vec<f64>> = genes.iter().map(|g| deltas[*g].clone()).collect();
    let model = LinearDeltaModel::fit(&x, &y, opts.lambda).context("fitting the linear baseline")?;
    let mut out = Vec::with_capacity(test.len());
    for c in test {
        let genes = c.genes();
        let vectors: Option<Vec<&[f32]>> = genes.iter().map(|g| embeddings.get(g)).collect();
        out.push(match vectors {
            Some(v) if !v.is_empty() => {
                let mut mu = control_mean.to_vec();
                for e in v {
                    for (o, d) in mu.iter_mut().zip(model.predict_delta(e)?) {
                        *o += d;
                    }
                }
                Some(mu)
            }
            _ => None,
        });
    }
    Ok(out)
}

/// Everything the baselines read.
#[derive(Debug, Clone)]
pub struct BaselineInputs<'a> {
    pub control_mean: &'a [f64],
    pub train: &'a [TrainingCondition<'a>],
    pub embeddings: Option<&'a GeneEmbeddings>,
    pub linear: LinearOptions,
}

/// μ̂ of each test condition under `kind`.
pub fn predict(kind: BaselineKind, inputs: &BaselineInputs, test: &[Condition]) -> Result<Vec<Option<Vec<f64>>>> {
    match kind {
        BaselineKind::NoChange => Ok(no_change(inputs.control_mean, test)),
        BaselineKind::TrainMean => train_mean(inputs.train, test),
        BaselineKind::Additive => additive(inputs.control_mean, inputs.train, test),
        BaselineKind::Linear => match inputs.embeddings {
            Some(e) => linear(inputs.control_mean, inputs.train, test, e, &inputs.linear),
            None => bail!("the linear baseline needs gene embeddings (one vector per gene symbol)"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primal_and_dual_ridge_agree() {
        let (n, d, g) = (5, 7, 3);
        let z: Vec<f64> = (0..n * d).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
        let y: Vec<f64> = (0..n * g).map(|i| ((i * 13 % 7) as f64 - 3.0) / 2.0).collect();
        let p = ridge_weights(&z, &y, n, d, g, 0.5, false).unwrap();
        let q = ridge_weights(&z, &y, n, d, g, 0.5, true).unwrap();
        for (a, b) in p.iter().zip(&q) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
    }
}
