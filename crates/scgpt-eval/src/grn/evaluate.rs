//! Predicted edges scored against a reference network ([`super::reference`]), with two
//! baselines on the same candidate pairs.
//!
//! Candidate set: the evaluated genes E are the predicted genes that the reference names (as a
//! regulator or a target); the candidates are every ordered pair (r, t) with r ∈ E a reference
//! regulator and t ∈ E, t ≠ r. A candidate is positive when the reference holds the edge r → t.
//! AUROC and AUPRC ([`super::ranking`]) rank the candidates by the prediction's score.
//!
//! Baselines: `coexpression`, |Pearson| of r and t over the cells of an expression matrix (0 for
//! a gene absent from the matrix or constant in it, counted); `random`, a uniform score per pair
//! from a hash of (seed, regulator, target), so the same seed gives the same scores whatever the
//! order of the genes.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use ndarray::{linalg::general_mat_mul, Array2};
use serde::Serialize;

use crate::csr::CsrMatrix;

use super::embedding::GeneEmbeddings;
use super::ranking::RankingScores;
use super::reference::ReferenceNetwork;

/// Scores of ordered gene pairs; indices are into the predicted gene list.
pub trait EdgeScorer {
    /// Row-major `regulators.len() × targets.len()` scores of (regulator, target).
    fn score_pairs(&self, regulators: &[usize], targets: &[usize]) -> Result<Vec<f64>>;
}

/// Cosine similarity of the gene embeddings (symmetric).
impl EdgeScorer for GeneEmbeddings {
    fn score_pairs(&self, regulators: &[usize], targets: &[usize]) -> Result<Vec<f64>> {
        self.cosine_block(regulators, targets)
    }
}

/// A dense n × n score matrix over the predicted genes, `scores[r * n + t]` for r → t (attention
/// scores, say).
#[derive(Debug, Clone)]
pub struct DenseScores {
    n: usize,
    scores: Vec<f64>,
}

impl DenseScores {
    pub fn new(n: usize, scores: Vec<f64>) -> Result<Self> {
        if scores.len() != n * n {
            bail!("edge scores: {} values for {n} genes (need n × n = {})", scores.len(), n * n);
        }
        Ok(DenseScores { n, scores })
    }
}

impl EdgeScorer for DenseScores {
    fn score_pairs(&self, regulators: &[usize], targets: &[usize]) -> Result<Vec<f64>> {
        if let Some(&bad) = regulators.iter().chain(targets).find(|&&i| i >= self.n) {
            bail!("edge scores: gene index {bad} is out of range for {} genes", self.n);
        }
        Ok(regulators.iter().flat_map(|&r| targets.iter().map(move |&t| self.scores[r * self.n + t])).collect())
    }
}

/// The `coexpression` baseline: |Pearson| over the cells of `x`.
pub struct Coexpression<'a> {
    x: CsrMatrix<'a>,
    /// Per predicted gene, its column in `x`.
    columns: Vec<Option<usize>>,
}

/// Cells per dense block of the covariance sweep.
const CELL_BLOCK: usize = 512;

impl<'a> Coexpression<'a> {
    /// `var_names` names the columns of `x`; `predicted_genes` are the genes the indices refer to.
    pub fn new(x: CsrMatrix<'a>, var_names: &[String], predicted_genes: &[String]) -> Result<Self> {
        if var_names.len() != x.n_cols() {
            bail!("coexpression baseline: {} gene names for a matrix of {} genes", var_names.len(), x.n_cols());
        }
        if let Some(v) = x.values().iter().find(|v| !v.is_finite()) {
            bail!("coexpression baseline: the expression matrix holds a non-finite value ({v})");
        }
        let index: HashMap<&str, usize> = var_names.iter().enumerate().map(|(j, g)| (g.as_str(), j)).collect();
        Ok(Coexpression { x, columns: predicted_genes.iter().map(|g| index.get(g.as_str()).copied()).collect() })
    }

    /// Centred dense block of cells `c0..c1` for the matrix columns `cols`.
    fn block(&self, c0: usize, c1: usize, cols: &[usize], means: &[f64], slot: &HashMap<usize, usize>) -> Array2<f64> {
        let mut b = Array2::from_shape_fn((c1 - c0, cols.len()), |(_, k)| -means[k]);
        for i in c0..c1 {
            let (idx, val) = self.x.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                if let Some(&k) = slot.get(&(j as usize)) {
                    b[[i - c0, k]] += v as f64;
                }
            }
        }
        b
    }
}

impl EdgeScorer for Coexpression<'_> {
    fn score_pairs(&self, regulators: &[usize], targets: &[usize]) -> Result<Vec<f64>> {
        let col = |g: usize| -> Result<Option<usize>> {
            self.columns.get(g).copied().ok_or_else(|| anyhow::anyhow!("coexpression baseline: gene index {g} is out of range"))
        };
        // Matrix columns needed, each once, and where each goes.
        let mut cols: Vec<usize> = Vec::new();
        let mut slot: HashMap<usize, usize> = HashMap::new();
        for &g in regulators.iter().chain(targets) {
            if let Some(j) = col(g)? {
                slot.entry(j).or_insert_with(|| {
                    cols.push(j);
                    cols.len() - 1
                });
            }
        }
        let n = self.x.n_rows();
        let mut means = vec![0f64; cols.len()];
        for i in 0..n {
            let (idx, val) = self.x.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                if let Some(&k) = slot.get(&(j as usize)) {
                    means[k] += v as f64;
                }
            }
        }
        means.iter_mut().for_each(|m| *m /= n.max(1) as f64);
        let rk: Vec<Option<usize>> = regulators.iter().map(|&g| Ok(col(g)?.map(|j| slot[&j]))).collect::<Result<_>>()?;
        let tk: Vec<Option<usize>> = targets.iter().map(|&g| Ok(col(g)?.map(|j| slot[&j]))).collect::<Result<_>>()?;
        let reg_slots: Vec<usize> = rk.iter().flatten().copied().collect();
        // cov[a][k]: Σ over cells of centred (regulator slot a) × (slot k).
        let mut cov = Array2::<f64>::zeros((reg_slots.len(), cols.len()));
        let mut var = vec![0f64; cols.len()];
        for c0 in (0..n).step_by(CELL_BLOCK) {
            let b = self.block(c0, (c0 + CELL_BLOCK).min(n), &cols, &means, &slot);
            let br = b.select(ndarray::Axis(1), &reg_slots);
            general_mat_mul(1.0, &br.t(), &b, 1.0, &mut cov);
            for (k, v) in var.iter_mut().enumerate() {
                *v += b.column(k).iter().map(|x| x * x).sum::<f64>();
            }
        }
        let mut row_of = vec![usize::MAX; cols.len()];
        for (a, &k) in reg_slots.iter().enumerate() {
            row_of[k] = a;
        }
        let mut out = Vec::with_capacity(regulators.len() * targets.len());
        for r in &rk {
            for t in &tk {
                out.push(match (r, t) {
                    (Some(a), Some(k)) if var[*a] > 0.0 && var[*k] > 0.0 => {
                        // Both regulators: read the entry of the lower row, so (r, t) and (t, r)
                        // get the very same score.
                        let c = if row_of[*k] < row_of[*a] { cov[[row_of[*k], *a]] } else { cov[[row_of[*a], *k]] };
                        (c / (var[*a] * var[*k]).sqrt()).abs().min(1.0)
                    }
                    _ => 0.0,
                });
            }
        }
        Ok(out)
    }
}

/// The `random` baseline: a uniform score in [0, 1) per (seed, regulator name, target name).
pub struct RandomScores<'a> {
    pub genes: &'a [String],
    pub seed: u64,
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl EdgeScorer for RandomScores<'_> {
    fn score_pairs(&self, regulators: &[usize], targets: &[usize]) -> Result<Vec<f64>> {
        let name = |g: usize| self.genes.get(g).ok_or_else(|| anyhow::anyhow!("random baseline: gene index {g} is out of range"));
        let mut out = Vec::with_capacity(regulators.len() * targets.len());
        for &r in regulators {
            let hr = splitmix64(self.seed ^ fnv1a(name(r)?));
            for &t in targets {
                let h = splitmix64(hr ^ fnv1a(name(t)?).rotate_left(17));
                out.push((h >> 11) as f64 / (1u64 << 53) as f64);
            }
        }
        Ok(out)
    }
}

/// The candidate pairs of a prediction against a reference (see the module docs).
#[derive(Debug, Clone)]
pub struct Candidates {
    /// Evaluated genes E (indices into the predicted genes, in predicted order).
    pub genes: Vec<usize>,
    /// Reference regulators in E.
    pub regulators: Vec<usize>,
    /// Per candidate (regulators × genes, row-major, the pairs t = r left out): is it a
    /// reference edge?
    pub labels: Vec<bool>,
    pub n_reference_edges: usize,
    pub n_reference_regulators: usize,
    pub n_reference_targets: usize,
}

impl Candidates {
    pub fn new(predicted_genes: &[String], reference: &ReferenceNetwork) -> Result<Self> {
        let mut index = HashMap::with_capacity(predicted_genes.len());
        for (i, g) in predicted_genes.iter().enumerate() {
            if index.insert(g.as_str(), i).is_some() {
                bail!("reference scoring: gene {g} appears twice among the predicted genes");
            }
        }
        let (regs, tgts) = (reference.regulators(), reference.targets());
        let genes: Vec<usize> = (0..predicted_genes.len())
            .filter(|&i| regs.contains(predicted_genes[i].as_str()) || tgts.contains(predicted_genes[i].as_str()))
            .collect();
        if genes.is_empty() {
            bail!(
                "{}: none of its {} regulators and {} targets is among the {} predicted genes; do both use the same gene symbols?",
                reference.source,
                regs.len(),
                tgts.len(),
                predicted_genes.len()
            );
        }
        let regulators: Vec<usize> = genes.iter().copied().filter(|&i| regs.contains(predicted_genes[i].as_str())).collect();
        if regulators.is_empty() {
            bail!(
                "{}: none of its {} regulators is among the {} predicted genes ({} of its {} targets are), so there is no edge to score",
                reference.source,
                regs.len(),
                predicted_genes.len(),
                genes.len(),
                tgts.len()
            );
        }
        let edges: HashSet<(usize, usize)> =
            reference.edges.iter().filter_map(|e| Some((*index.get(e.regulator.as_str())?, *index.get(e.target.as_str())?))).collect();
        let labels = regulators
            .iter()
            .flat_map(|&r| genes.iter().filter(move |&&t| t != r).map(move |&t| (r, t)))
            .map(|p| edges.contains(&p))
            .collect();
        Ok(Candidates {
            genes,
            regulators,
            labels,
            n_reference_edges: reference.edges.len(),
            n_reference_regulators: regs.len(),
            n_reference_targets: tgts.len(),
        })
    }

    /// The scorer's scores of the candidates, in `labels` order; NaN is an error.
    pub fn scores(&self, scorer: &dyn EdgeScorer, what: &str) -> Result<Vec<f64>> {
        let all = scorer.score_pairs(&self.regulators, &self.genes)?;
        if all.len() != self.regulators.len() * self.genes.len() {
            bail!("{what}: {} scores for {} × {} pairs", all.len(), self.regulators.len(), self.genes.len());
        }
        let n = self.genes.len();
        let mut out = Vec::with_capacity(self.labels.len());
        for (a, &r) in self.regulators.iter().enumerate() {
            for (b, &t) in self.genes.iter().enumerate() {
                if t != r {
                    out.push(all[a * n + b]);
                }
            }
        }
        if let Some(p) = out.iter().position(|v| v.is_nan()) {
            bail!("{what}: the score of candidate pair {p} is NaN");
        }
        Ok(out)
    }

    pub fn rank(&self, scorer: &dyn EdgeScorer, what: &str) -> Result<RankingScores> {
        RankingScores::of(&self.scores(scorer, what)?, &self.labels)
    }
}

/// What [`evaluate_against_reference`] reports (serialises to JSON; undefined metrics are null).
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceEvaluation {
    pub reference: String,
    pub n_reference_edges: usize,
    pub n_reference_regulators: usize,
    pub n_reference_targets: usize,
    pub n_genes_evaluated: usize,
    pub n_regulators_evaluated: usize,
    pub n_candidates: usize,
    /// Reference edges among the candidates (the positives).
    pub n_edges_evaluated: usize,
    /// Positives / candidates: the AUPRC a random ranking gets on average.
    pub prevalence: f64,
    pub model: RankingScores,
    /// None when no expression matrix was given.
    pub coexpression: Option<RankingScores>,
    /// Evaluated genes absent from the expression matrix (scored 0 by the baseline).
    pub coexpression_genes_missing: usize,
    pub random: RankingScores,
    pub random_seed: u64,
}

/// Scores `model`'s edges over `predicted_genes` against `reference`, with the random baseline
/// (seeded) and, given an expression matrix and its gene names, the coexpression baseline.
pub fn evaluate_against_reference(
    predicted_genes: &[String],
    model: &dyn EdgeScorer,
    reference: &ReferenceNetwork,
    expression: Option<(CsrMatrix, &[String])>,
    seed: u64,
) -> Result<ReferenceEvaluation> {
    let c = Candidates::new(predicted_genes, reference)?;
    let positives = c.labels.iter().filter(|&&l| l).count();
    let model_scores = c.rank(model, "model edge scores")?;
    let random = c.rank(&RandomScores { genes: predicted_genes, seed }, "random baseline")?;
    let (coexpression, missing) = match expression {
        Some((x, names)) => {
            let co = Coexpression::new(x, names, predicted_genes)?;
            let missing = c.genes.iter().filter(|&&g| co.columns[g].is_none()).count();
            (Some(c.rank(&co, "coexpression baseline")?), missing)
        }
        None => (None, 0),
    };
    Ok(ReferenceEvaluation {
        reference: reference.source.clone(),
        n_reference_edges: c.n_reference_edges,
        n_reference_regulators: c.n_reference_regulators,
        n_reference_targets: c.n_reference_targets,
        n_genes_evaluated: c.genes.len(),
        n_regulators_evaluated: c.regulators.len(),
        n_candidates: c.labels.len(),
        n_edges_evaluated: positives,
        prevalence: if c.labels.is_empty() { 0.0 } else { positives as f64 / c.labels.len() as f64 },
        model: model_scores,
        coexpression,
        coexpression_genes_missing: missing,
        random,
        random_seed: seed,
    })
}
