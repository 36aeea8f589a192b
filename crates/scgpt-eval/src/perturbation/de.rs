//! Differentially expressed genes per condition, as GEARS stores them in `perturb_processed.h5ad`:
//! `rank_genes_groups_cov_all` (scanpy's `rank_genes_groups(groupby=condition_name,
//! reference=<ctrl group>, rankby_abs=True, n_genes=all)`, default t-test) and
//! `top_non_dropout_de_20` (GEARS `get_dropout_non_zero_genes`).
//!
//! Scores follow scanpy 1.11's sparse path with one numba thread: per gene f64 sums of each value
//! and of its square taken in f32, mean = sum/n, var = (sumsq/n − mean²)·n/(n−1); then scipy's
//! Welch t with `std = sqrt(var)` squared back (as `ttest_ind_from_stats` gets it), and NaN
//! (0/0: a gene constant and equal in both groups, or a variance rounding below zero) set to 0.
//! Genes are ranked by |t|, descending. scanpy orders exactly tied |t| by numpy's unstable
//! argpartition + argsort, which has no rule; we put the lower gene index first.
//!
//! A gene is a dropout for a condition when its mean there is 0 but the control mean is not;
//! `top_non_dropout` is the first n non-dropout genes of the full ranking.

use anyhow::{bail, ensure, Result};
use serde::Serialize;

use crate::{CsrMatrix, OwnedCsr};

#[derive(Debug, Clone)]
pub struct DeOptions {
    /// How many of the ranked genes to keep (GEARS and scGPT use the first 20).
    pub n_top: usize,
    pub n_non_dropout: usize,
}

impl Default for DeOptions {
    fn default() -> Self {
        DeOptions { n_top: 20, n_non_dropout: 20 }
    }
}

/// The DE genes of one condition (gene indices are columns of the matrix).
#[derive(Debug, Clone, Serialize)]
pub struct DeGenes {
    pub condition: String,
    pub group: usize,
    /// The `n_top` genes with the largest |t|, best first.
    pub top: Vec<usize>,
    /// Their t statistics (signed: positive = higher than in the control).
    pub scores: Vec<f64>,
    /// The first `n_non_dropout` genes of the ranking that are not dropouts.
    pub top_non_dropout: Vec<usize>,
}

/// A dense row-major cells × genes matrix as CSR (zeros left out), for [`rank_genes_groups`].
pub fn csr_from_dense(values: &[f32], n_cols: usize) -> Result<OwnedCsr> {
    ensure!(n_cols > 0 && values.len().is_multiple_of(n_cols), "a dense matrix of {} values cannot have {n_cols} columns", values.len());
    let mut m = OwnedCsr { indptr: vec![0], n_cols, ..Default::default() };
    for row in values.chunks(n_cols) {
        for (j, &v) in row.iter().enumerate() {
            if v != 0.0 {
                m.indices.push(j as u32);
                m.data.push(v);
            }
        }
        m.indptr.push(m.indices.len());
    }
    Ok(m)
}

/// Per group: cell count, and per gene f64 sums of x and of x² (squared in f32).
struct GroupSums {
    n: Vec<usize>,
    sum: Vec<Vec<f64>>,
    sumsq: Vec<Vec<f64>>,
}

fn group_sums(x: &CsrMatrix, cell_group: &[usize], names: &[String]) -> Result<GroupSums> {
    ensure!(cell_group.len() == x.n_rows(), "{} cells have a group but the matrix has {} rows", cell_group.len(), x.n_rows());
    let g = x.n_cols();
    let mut s = GroupSums { n: vec![0; names.len()], sum: vec![Vec::new(); names.len()], sumsq: vec![Vec::new(); names.len()] };
    for (i, &k) in cell_group.iter().enumerate() {
        ensure!(k < names.len(), "cell {i} is in group {k} but there are only {} groups", names.len());
        if s.n[k] == 0 {
            s.sum[k] = vec![0.0; g];
            s.sumsq[k] = vec![0.0; g];
        }
        s.n[k] += 1;
        let (idx, val) = x.row(i);
        for (&j, &v) in idx.iter().zip(val) {
            if !v.is_finite() {
                bail!("cell {i}, gene {j}: value {v} is not finite; DE genes need a finite log-normalised matrix");
            }
            s.sum[k][j as usize] += v as f64;
            s.sumsq[k][j as usize] += (v * v) as f64;
        }
    }
    Ok(s)
}

/// scanpy's `_get_mean_var` for one group from its sums.
fn mean_var(n: usize, sum: &[f64], sumsq: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let nf = n as f64;
    let correction = if n != 1 { nf / (nf - 1.0) } else { 1.0 };
    let mean: Vec<f64> = sum.iter().map(|&s| s / nf).collect();
    let var = sumsq.iter().zip(&mean).map(|(&q, &m)| (q / nf - m * m) * correction).collect();
    (mean, var)
}

/// Welch's t as scipy's `ttest_ind_from_stats(equal_var=False)` computes it from scanpy's
/// statistics, with scanpy's NaN → 0.
fn welch_t(m1: f64, var1: f64, n1: usize, m2: f64, var2: f64, n2: usize) -> f64 {
    let (s1, s2) = (var1.sqrt(), var2.sqrt());
    let denom = (s1 * s1 / n1 as f64 + s2 * s2 / n2 as f64).sqrt();
    let t = (m1 - m2) / denom;
    if t.is_nan() {
        0.0
    } else {
        t
    }
}

/// DE genes of every group against `control`, for the groups that have cells. `cell_group[i]`
/// is cell i's index into `group_names`. Like scanpy, a group with a single cell (or a control
/// with fewer than 2) is an error.
pub fn rank_genes_groups(
    x: &CsrMatrix,
    cell_group: &[usize],
    group_names: &[String],
    control: usize,
    opts: &DeOptions,
) -> Result<Vec<DeGenes>> {
    ensure!(control < group_names.len(), "control group {control} is out of range ({} groups)", group_names.len());
    let s = group_sums(x, cell_group, group_names)?;
    let ctrl_name = &group_names[control];
    if s.n[control] < 2 {
        bail!("the control group {ctrl_name:?} has {} cell(s); the t-test needs at least 2 control cells", s.n[control]);
    }
    if let Some(k) = (0..group_names.len()).find(|&k| s.n[k] == 1) {
        bail!(
            "condition {:?} has a single cell, so its variance is undefined (scanpy refuses it too); \
             drop conditions with fewer than 2 cells before computing DE genes",
            group_names[k]
        );
    }
    let (c_mean, c_var) = mean_var(s.n[control], &s.sum[control], &s.sumsq[control]);
    let mut out = Vec::new();
    for (k, name) in group_names.iter().enumerate() {
        if k == control || s.n[k] == 0 {
            continue;
        }
        let (mean, var) = mean_var(s.n[k], &s.sum[k], &s.sumsq[k]);
        let scores: Vec<f64> = (0..x.n_cols()).map(|j| welch_t(mean[j], var[j], s.n[k], c_mean[j], c_var[j], s.n[control])).collect();
        let mut order: Vec<usize> = (0..x.n_cols()).collect();
        // Stable: exact ties keep the lower gene index first.
        order.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()));
        let dropout = |j: usize| mean[j] == 0.0 && c_mean[j] != 0.0;
        let top: Vec<usize> = order.iter().take(opts.n_top).copied().collect();
        out.push(DeGenes {
            condition: name.clone(),
            group: k,
            scores: top.iter().map(|&j| scores[j]).collect(),
            top,
            top_non_dropout: order.iter().copied().filter(|&j| !dropout(j)).take(opts.n_non_dropout).collect(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welch_t_and_the_nan_rule() {
        // Two groups of 3: means 2 and 1, variances 1 and 1 → t = 1 / sqrt(2/3).
        let t = welch_t(2.0, 1.0, 3, 1.0, 1.0, 3);
        assert!((t - 1.0 / (2.0f64 / 3.0).sqrt()).abs() < 1e-15);
        assert_eq!(welch_t(1.0, 0.0, 3, 1.0, 0.0, 4), 0.0);
        assert_eq!(welch_t(2.0, 0.0, 3, 1.0, 0.0, 4), f64::INFINITY);
    }

    #[test]
    fn dropouts_are_skipped_and_singletons_refused() {
        // genes: 0 drops out in group 1 (expressed in control), 1 rises, 2 is zero everywhere.
        let dense = [
            1.0, 0.1, 0.0, //
            1.2, 0.2, 0.0, //
            0.9, 0.0, 0.0, //
            0.0, 3.0, 0.0, //
            0.0, 3.5, 0.0, //
        ];
        let m = csr_from_dense(&dense, 3).unwrap();
        let x = m.csr().unwrap();
        let names = vec!["ctrl".to_string(), "A+ctrl".to_string()];
        let de = rank_genes_groups(&x, &[0, 0, 0, 1, 1], &names, 0, &DeOptions { n_top: 3, n_non_dropout: 3 }).unwrap();
        assert_eq!(de.len(), 1);
        // |t|: gene 1 12.3, gene 0 11.7 (falls to 0), gene 2 0 (0/0)
        assert_eq!(de[0].top, [1, 0, 2]);
        assert_eq!(de[0].top_non_dropout, [1, 2]);
        let e = rank_genes_groups(&x, &[0, 0, 0, 0, 1], &names, 0, &DeOptions::default()).unwrap_err();
        assert!(e.to_string().contains("\"A+ctrl\" has a single cell"), "{e}");
    }
}
