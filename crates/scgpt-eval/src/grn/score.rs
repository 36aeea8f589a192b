//! scanpy 1.11.5's `sc.tl.score_genes` (Seurat's module score), step for step: the mean
//! expression of a gene list minus the mean of control genes drawn from the same expression bins.
//!
//! - Every gene's average over the cells: scipy sums a float32 CSR matrix's columns as a float32
//!   product with ones (cells in order, float32 accumulator), then divides in f64;
//!   `rank(method="min")` of those averages, bins `rank // n_items` with
//!   `n_items = round(n_genes / (n_bins − 1))` (numpy's half-to-even rounding; 0 puts every gene
//!   in one bin, as pandas' `rank // 0` = inf does). The gene pool is every gene of the matrix.
//! - For each bin the list touches, in increasing order: the bin's genes in matrix order; when
//!   there are more than `ctrl_size`, `ctrl_size` of them drawn as pandas' `Series.sample` draws
//!   them from numpy's global legacy RandomState (`permutation(len)[:ctrl_size]`), seeded once per
//!   call with `random_state` (0); then the list's own genes are removed (`ctrl_as_ref=True`).
//!   The control set is the union over bins.
//! - Score per cell = mean over the list's genes − mean over the control genes. scipy sums a row
//!   of the column subset with `np.add.reduceat` on the float32 values (explicit zeros dropped
//!   by scanpy's `eliminate_zeros`; stored order): the first value plus numpy's float32 pairwise
//!   sum of the rest; the division and the difference are in f64. We sum the same way, so the
//!   scores agree to the last bit.
//!
//! The list's genes missing from the matrix are ignored (scanpy warns); repeated names count
//! once. NaN values are refused here (scanpy's nanmean would skip them).

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::csr::CsrMatrix;
use crate::perturbation::LegacyRandomState;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreGenesOptions {
    /// Control genes drawn per expression bin (scanpy's `ctrl_size`, 50).
    pub ctrl_size: usize,
    /// Expression bins (scanpy's `n_bins`, 25); at least 2.
    pub n_bins: usize,
    /// numpy's `np.random.seed(random_state)` (scanpy's default 0).
    pub random_state: u32,
}

impl Default for ScoreGenesOptions {
    fn default() -> Self {
        ScoreGenesOptions { ctrl_size: 50, n_bins: 25, random_state: 0 }
    }
}

/// One list's scores and how they were made.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneScore {
    /// Per cell, in matrix row order.
    pub scores: Vec<f64>,
    /// The list's genes found in the matrix (column indices, in list order, each once).
    pub genes: Vec<usize>,
    /// The list's names that are not matrix genes.
    pub ignored: Vec<String>,
    /// The control genes (column indices, increasing).
    pub control_genes: Vec<usize>,
}

/// A cells × genes matrix (log-normalised, as `adata.X` in the tutorial) with its gene names,
/// and the per-gene averages and ranks every call shares.
pub struct GeneScorer<'a> {
    x: CsrMatrix<'a>,
    var_names: &'a [String],
    index: HashMap<&'a str, usize>,
    /// rank(method="min") of each gene's average, 1-based.
    rank_min: Vec<u64>,
}

impl<'a> GeneScorer<'a> {
    /// Checks the matrix (finite values, at least one cell) and the names (one per column,
    /// unique).
    pub fn new(x: CsrMatrix<'a>, var_names: &'a [String]) -> Result<Self> {
        if var_names.len() != x.n_cols() {
            bail!("score_genes: {} gene names for a matrix of {} genes", var_names.len(), x.n_cols());
        }
        if x.n_rows() == 0 {
            bail!("score_genes: the matrix has no cells");
        }
        if let Some(v) = x.values().iter().find(|v| !v.is_finite()) {
            bail!("score_genes: the matrix holds a non-finite value ({v}); fix or drop those cells first");
        }
        let mut index = HashMap::with_capacity(var_names.len());
        for (j, g) in var_names.iter().enumerate() {
            if index.insert(g.as_str(), j).is_some() {
                bail!("score_genes: gene {g} appears twice in the matrix's gene names; make them unique");
            }
        }
        let n = x.n_rows();
        let mut sums = vec![0f32; x.n_cols()];
        for i in 0..n {
            let (idx, val) = x.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                sums[j as usize] += v;
            }
        }
        let means: Vec<f64> = sums.iter().map(|&s| s as f64 / n as f64).collect();
        Ok(GeneScorer { x, var_names, index, rank_min: rank_min(&means) })
    }

    pub fn n_cells(&self) -> usize {
        self.x.n_rows()
    }
    pub fn var_names(&self) -> &[String] {
        self.var_names
    }

    /// `sc.tl.score_genes(adata, gene_list, ctrl_size, n_bins, random_state)`.
    pub fn score(&self, gene_list: &[String], opts: &ScoreGenesOptions) -> Result<GeneScore> {
        if opts.n_bins < 2 {
            bail!("score_genes: n_bins = {} must be at least 2 (scanpy divides by n_bins − 1)", opts.n_bins);
        }
        let mut genes = Vec::new();
        let mut ignored = Vec::new();
        let mut in_list = vec![false; self.var_names.len()];
        for g in gene_list {
            match self.index.get(g.as_str()) {
                Some(&j) if !in_list[j] => {
                    in_list[j] = true;
                    genes.push(j);
                }
                Some(_) => {}
                None => ignored.push(g.clone()),
            }
        }
        if genes.is_empty() {
            bail!("score_genes: none of the {} listed genes is among the matrix's {} genes", gene_list.len(), self.var_names.len());
        }
        let n_genes = self.var_names.len();
        let n_items = (n_genes as f64 / (opts.n_bins - 1) as f64).round_ties_even() as u64;
        let cut = |j: usize| self.rank_min[j].checked_div(n_items).unwrap_or(u64::MAX);
        let cuts: BTreeSet<u64> = genes.iter().map(|&j| cut(j)).collect();
        let mut rng = LegacyRandomState::new(opts.random_state as u64)?;
        let mut control = vec![false; n_genes];
        for c in cuts {
            let mut r_genes: Vec<usize> = (0..n_genes).filter(|&j| cut(j) == c).collect();
            if opts.ctrl_size < r_genes.len() {
                let pick = rng.permutation(r_genes.len());
                r_genes = pick[..opts.ctrl_size].iter().map(|&p| r_genes[p]).collect();
            }
            for j in r_genes {
                control[j] |= !in_list[j];
            }
        }
        let control_genes: Vec<usize> = (0..n_genes).filter(|&j| control[j]).collect();
        if control_genes.is_empty() {
            bail!(
                "score_genes: no control genes (every gene in the expression bins of the list is in the list); the list has {} of the {n_genes} genes",
                genes.len()
            );
        }
        let (n_list, n_ctrl) = (genes.len() as f64, control_genes.len() as f64);
        let scores = (0..self.x.n_rows())
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(list_vals, ctrl_vals), i| {
                    let (idx, val) = self.x.row(i);
                    list_vals.clear();
                    ctrl_vals.clear();
                    for (&j, &v) in idx.iter().zip(val) {
                        if v == 0.0 {
                            continue;
                        }
                        if in_list[j as usize] {
                            list_vals.push(v);
                        } else if control[j as usize] {
                            ctrl_vals.push(v);
                        }
                    }
                    reduceat_sum(list_vals) as f64 / n_list - reduceat_sum(ctrl_vals) as f64 / n_ctrl
                },
            )
            .collect();
        Ok(GeneScore { scores, genes, ignored, control_genes })
    }
}

/// One segment of numpy's `np.add.reduceat` on float32: the first value, then `+=` the pairwise
/// sum of the rest (the reduction loop's `*out += pairwise_sum(rest)`); 0 when empty.
fn reduceat_sum(v: &[f32]) -> f32 {
    match v.split_first() {
        None => 0.0,
        Some((&first, [])) => first,
        Some((&first, rest)) => first + pairwise_sum(rest),
    }
}

/// numpy's `FLOAT_pairwise_sum` (loops_utils.h): below 8 values a plain loop from −0.0; up to
/// 128, eight accumulators combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) and the tail added
/// one by one; above, split at n/2 rounded down to a multiple of 8 and recursed. All in float32.
fn pairwise_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        return a.iter().fold(-0.0f32, |s, &v| s + v);
    }
    if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        for chunk in a[8..full].chunks_exact(8) {
            for k in 0..8 {
                r[k] += chunk[k];
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[full..] {
            res += v;
        }
        return res;
    }
    let mut n2 = n / 2;
    n2 -= n2 % 8;
    pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
}

/// pandas' `rank(method="min")`: 1 + the number of strictly smaller values.
fn rank_min(values: &[f64]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut rank = vec![0u64; values.len()];
    let mut start = 0;
    for p in 0..order.len() {
        if values[order[p]] != values[order[start]] {
            start = p;
        }
        rank[order[p]] = start as u64 + 1;
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_pandas_min_ranks() {
        assert_eq!(rank_min(&[0.5, 0.0, 0.5, 2.0, 0.0]), vec![3, 1, 3, 5, 1]);
        assert_eq!(rank_min(&[]), Vec::<u64>::new());
    }

    #[test]
    fn bad_input_is_an_error() {
        let names: Vec<String> = ["A", "B", "C"].map(String::from).to_vec();
        let (indptr, indices, data) = (vec![0, 2, 3], vec![0u32, 2, 1], vec![1.0f32, 2.0, 3.0]);
        let x = CsrMatrix::new(&indptr, &indices, &data, 3).unwrap();
        let s = GeneScorer::new(x, &names).unwrap();
        assert!(s.score(&["Z".into()], &ScoreGenesOptions::default()).is_err());
        assert!(s.score(&["A".into()], &ScoreGenesOptions { n_bins: 1, ..Default::default() }).is_err());
        // Three genes and 25 bins: n_items rounds to 0, all genes share one bin.
        let r = s.score(&["A".into(), "A".into(), "Q".into()], &ScoreGenesOptions::default()).unwrap();
        assert_eq!((r.genes.clone(), r.ignored.clone(), r.control_genes.clone()), (vec![0], vec!["Q".to_string()], vec![1, 2]));
        assert_eq!(r.scores, vec![1.0 - 1.0, 0.0 - 1.5]);
        assert!(s.score(&names, &ScoreGenesOptions::default()).is_err(), "no control genes left");
        let dup: Vec<String> = ["A", "A", "C"].map(String::from).to_vec();
        assert!(GeneScorer::new(x, &dup).is_err());
        assert!(GeneScorer::new(x, &names[..2]).is_err());
        let nan = [1.0f32, f32::NAN, 3.0];
        assert!(GeneScorer::new(CsrMatrix::new(&indptr, &indices, &nan, 3).unwrap(), &names).is_err());
    }
}
