//! Harmony batch correction of an embedding (Korsunsky et al. 2019, Nature Methods 16:1289) as
//! harmonypy 2.1.0 runs it (its C++ backend, which follows the R package's "harmony2"
//! algorithm), for one batch variable.
//!
//! Cells are scaled to unit length and soft-clustered around K centroids (k-means init, then
//! soft k-means whose assignments carry a diversity penalty: a cluster's pull on a cell falls
//! with the over-representation of the cell's batch in it, `theta`). Per cluster a ridge
//! regression of the original coordinates on the batches (intercept unpenalised, batch `b`
//! penalised by `alpha · E[k, b]`, its expected weight) gives a per-batch offset, and each cell
//! moves by the R-weighted sum of its batch's offsets. The intercept row becomes the cluster's
//! new centroid. Repeat until the objective stops falling by `epsilon_harmony`.
//!
//! Defaults are harmonypy 2.1.0's, which are what `sc.external.pp.harmony_integrate` gets:
//! theta 2, sigma 0.1, K = min(round(N/30), 100), lambda estimated per cluster from
//! alpha = 0.2, 10 Harmony rounds of at most 4 k-means rounds, epsilon_cluster 1e-3,
//! epsilon_harmony 1e-2, blocks of 5% of the cells. (harmonypy before 0.1 had lambda = 1,
//! 20 k-means rounds, epsilons 1e-5 / 1e-4 and a centroid update inside the k-means loop;
//! `lambda: Some(1.0)` gives the fixed ridge penalty, the rest follows 2.1.0.)
//!
//! Differences from harmonypy, by design:
//! - Initial centroids: a seeded k-means++ (ChaCha8) on the unit-length cells, then up to 10
//!   Lloyd rounds (harmonypy: R harmony's own seeding from a Mersenne Twister, then 10 Lloyd
//!   rounds). The random numbers differ, so results agree with harmonypy as two of its seeds
//!   agree with each other, not value for value; the block shuffles use ChaCha8 too.
//! - Arithmetic in f64 (harmonypy: float32, with double sums in the ridge step).
//! - Rows of length zero stay zero when scaled to unit length (they have no direction).
//! - Only one batch variable (harmonypy also takes several).
//!
//! Deterministic for a seed: parallel work is per cell or per cluster, and every sum over cells
//! runs in cell order on one thread, so the thread count does not change the result.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Cells per rayon task in the per-cell loops: below this the loop runs on one thread.
const MIN_PAR_CELLS: usize = 256;
/// harmonypy's k-means convergence window (objective sums over the last 3 rounds).
const WINDOW: usize = 3;
/// Lloyd rounds after the k-means++ seeding (harmonypy: 10 after its own seeding).
const LLOYD_ROUNDS: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HarmonyOptions {
    /// Diversity penalty per batch (harmonypy `theta`).
    pub theta: f64,
    /// Ridge penalty per batch; None estimates it per cluster as `alpha · E[k, b]` (harmonypy
    /// 2.x's default, `lamb=None`).
    pub lambda: Option<f64>,
    pub alpha: f64,
    /// Soft k-means bandwidth (harmonypy `sigma`), the same for every cluster.
    pub sigma: f64,
    /// Number of clusters; None: min(round(N / 30), 100), at least 1.
    pub n_clusters: Option<usize>,
    pub max_iter_harmony: usize,
    pub max_iter_kmeans: usize,
    pub epsilon_cluster: f64,
    pub epsilon_harmony: f64,
    /// Share of the cells whose assignments are updated together.
    pub block_size: f64,
    /// A cluster corrects a batch only where the batch's mean assignment to it exceeds this.
    pub batch_prop_cutoff: f64,
    pub seed: u64,
}

impl Default for HarmonyOptions {
    fn default() -> Self {
        HarmonyOptions {
            theta: 2.0,
            lambda: None,
            alpha: 0.2,
            sigma: 0.1,
            n_clusters: None,
            max_iter_harmony: 10,
            max_iter_kmeans: 4,
            epsilon_cluster: 1e-3,
            epsilon_harmony: 1e-2,
            block_size: 0.05,
            batch_prop_cutoff: 1e-5,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HarmonyResult {
    /// The corrected embedding, row-major cells × `dim` (harmonypy's `Z_corr`).
    #[serde(skip)]
    pub corrected: Vec<f32>,
    pub dim: usize,
    pub n_clusters: usize,
    pub n_batches: usize,
    /// Harmony rounds run (each: clustering, then correction).
    pub iterations: usize,
    /// Whether the objective stopped falling by `epsilon_harmony` before `max_iter_harmony`.
    pub converged: bool,
    /// The objective after the initial clustering and after each round's clustering.
    pub objective_harmony: Vec<f64>,
    /// k-means rounds per Harmony round.
    pub kmeans_rounds: Vec<usize>,
}

/// Python's `round` (half to even), which harmonypy uses for the default cluster count.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// The default number of clusters for `n` cells: min(round(n / 30), 100), at least 1
/// (harmonypy refuses 0, i.e. fewer than 16 cells).
pub fn default_n_clusters(n: usize) -> usize {
    (round_half_even(n as f64 / 30.0) as usize).clamp(1, 100)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn scale_to_unit(v: &mut [f64]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// In-place softmax of one row of logits; false if the normaliser is not finite and positive.
fn softmax(x: &mut [f64]) -> bool {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        total += *v;
    }
    if !(total.is_finite() && total > 0.0) {
        return false;
    }
    x.iter_mut().for_each(|v| *v /= total);
    true
}

/// Seeded k-means++ then Lloyd rounds on the rows of `x` (n × d); returns K × d centroids.
fn kmeans_init(x: &[f64], n: usize, d: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let mut centroids = Vec::with_capacity(k * d);
    let mut chosen = vec![false; n];
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(row(first));
    chosen[first] = true;
    let mut min_d: Vec<f64> = (0..n).into_par_iter().with_min_len(MIN_PAR_CELLS).map(|i| sq_dist(row(i), row(first))).collect();
    for _ in 1..k {
        let total: f64 = min_d.iter().enumerate().filter(|(i, _)| !chosen[*i]).map(|(_, v)| v).sum();
        let next = if total > 0.0 {
            // D² sampling: a cell with probability proportional to its squared distance to the
            // nearest chosen centroid.
            let mut u = rng.random::<f64>() * total;
            let mut pick = None;
            for i in 0..n {
                if chosen[i] || min_d[i] <= 0.0 {
                    continue;
                }
                pick = Some(i);
                u -= min_d[i];
                if u <= 0.0 {
                    break;
                }
            }
            pick.expect("a positive total has a positive term")
        } else {
            // Every remaining cell sits on a centroid (duplicates): any unchosen cell.
            let free: Vec<usize> = (0..n).filter(|&i| !chosen[i]).collect();
            free[rng.random_range(0..free.len())]
        };
        chosen[next] = true;
        centroids.extend_from_slice(row(next));
        let c = row(next);
        min_d.par_iter_mut().with_min_len(MIN_PAR_CELLS).enumerate().for_each(|(i, m)| *m = m.min(sq_dist(row(i), c)));
    }
    // Lloyd rounds; a centroid that loses all its cells stays where it was.
    let mut assign = vec![usize::MAX; n];
    for _ in 0..LLOYD_ROUNDS {
        let new_assign: Vec<usize> = (0..n)
            .into_par_iter()
            .with_min_len(MIN_PAR_CELLS)
            .map(|i| {
                let xi = row(i);
                let mut best = (f64::INFINITY, 0usize);
                for c in 0..k {
                    let dd = sq_dist(xi, &centroids[c * d..(c + 1) * d]);
                    if dd < best.0 {
                        best = (dd, c);
                    }
                }
                best.1
            })
            .collect();
        if new_assign == assign {
            break;
        }
        assign = new_assign;
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for (i, &c) in assign.iter().enumerate() {
            counts[c] += 1;
            for (s, v) in sums[c * d..(c + 1) * d].iter_mut().zip(row(i)) {
                *s += v;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for a in 0..d {
                    centroids[c * d + a] = sums[c * d + a] / counts[c] as f64;
                }
            }
        }
    }
    centroids
}

/// One cluster's ridge solution: the intercept row (the new centroid, d values) and one
/// offset row per batch (B × d; zero for batches the cluster does not correct).
struct Ridge {
    centroid: Vec<f64>,
    offsets: Vec<f64>,
}

/// The state of one run; matrices are row-major with cells (or clusters) as rows.
struct State<'a> {
    n: usize,
    d: usize,
    k: usize,
    nb: usize,
    batch: &'a [u32],
    /// Cells per batch and their share of all cells.
    batch_size: Vec<f64>,
    pr_b: Vec<f64>,
    z_orig: Vec<f64>,
    /// Corrected coordinates (scaled to unit length while clustering).
    z_corr: Vec<f64>,
    /// Centroids, K × d, unit length.
    y: Vec<f64>,
    /// 2 (1 − cos) from each cell to each centroid, N × K.
    dist: Vec<f64>,
    /// Soft assignments, N × K, rows sum to 1.
    r: Vec<f64>,
    /// Observed (O) and expected (E) assignment weight per cluster and batch, K × B.
    o: Vec<f64>,
    e: Vec<f64>,
    opts: &'a HarmonyOptions,
    objective_kmeans: Vec<f64>,
    objective_harmony: Vec<f64>,
    kmeans_rounds: Vec<usize>,
    rng: ChaCha8Rng,
}

impl State<'_> {
    fn normalise_z_corr(&mut self) {
        let d = self.d;
        self.z_corr.par_chunks_mut(d).with_min_len(MIN_PAR_CELLS).for_each(scale_to_unit);
    }

    /// dist and R = softmax(−dist / sigma) for every cell, without the diversity penalty.
    fn assign_without_diversity(&mut self) -> Result<()> {
        let (d, k, sigma) = (self.d, self.k, self.opts.sigma);
        let (z, y) = (&self.z_corr, &self.y);
        let ok = self
            .dist
            .par_chunks_mut(k)
            .zip(self.r.par_chunks_mut(k))
            .enumerate()
            .with_min_len(MIN_PAR_CELLS)
            .map(|(i, (dist, r))| {
                let zi = &z[i * d..(i + 1) * d];
                for c in 0..k {
                    dist[c] = 2.0 * (1.0 - dot(zi, &y[c * d..(c + 1) * d]));
                    r[c] = -dist[c] / sigma;
                }
                softmax(r)
            })
            .all(|ok| ok);
        if !ok {
            bail!("Harmony: soft cluster assignments underflowed (sigma {sigma} too small for these distances?)");
        }
        Ok(())
    }

    /// E[k, b] = (Σ_cells R[·, k]) · Pr_b and O[k, b] = Σ_{cells of b} R[·, k], in cell order.
    fn rebuild_o_e(&mut self) {
        let (k, nb) = (self.k, self.nb);
        self.o.iter_mut().for_each(|v| *v = 0.0);
        let mut totals = vec![0f64; k];
        for (i, row) in self.r.chunks(k).enumerate() {
            let b = self.batch[i] as usize;
            for (c, (&v, t)) in row.iter().zip(totals.iter_mut()).enumerate() {
                self.o[c * nb + b] += v;
                *t += v;
            }
        }
        for (c, t) in totals.iter().enumerate() {
            for (b, p) in self.pr_b.iter().enumerate() {
                self.e[c * nb + b] = t * p;
            }
        }
    }

    /// Σ R·dist + Σ sigma R ln R + Σ theta sigma O ln((O + E + 1)/(2E + 1)), times 2000 / N.
    fn objective(&self) -> f64 {
        let (k, nb, sigma, theta) = (self.k, self.nb, self.opts.sigma, self.opts.theta);
        let per_cell: Vec<(f64, f64)> = (0..self.n)
            .into_par_iter()
            .with_min_len(MIN_PAR_CELLS)
            .map(|i| {
                let (mut err, mut ent) = (0.0, 0.0);
                for c in 0..k {
                    let v = self.r[i * k + c];
                    err += v * self.dist[i * k + c];
                    if v > 0.0 {
                        ent += sigma * v * v.ln();
                    }
                }
                (err, ent)
            })
            .collect();
        let (err, ent) = per_cell.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let mut cross = 0.0;
        for c in 0..k {
            for b in 0..nb {
                let (o, e) = (self.o[c * nb + b], self.e[c * nb + b]);
                cross += theta * sigma * o * ((o + e + 1.0) / (2.0 * e + 1.0)).ln();
            }
        }
        (err + ent + cross) * 2000.0 / self.n as f64
    }

    /// One pass of soft k-means over all cells in shuffled blocks: a block's cells leave O and
    /// E, are reassigned with the diversity penalty from the others, and are put back.
    fn update_r(&mut self) -> Result<()> {
        let (n, k, nb) = (self.n, self.k, self.nb);
        let (sigma, theta) = (self.opts.sigma, self.opts.theta);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        let n_blocks = (1.0 / self.opts.block_size).ceil() as usize;
        let per_block = ((n as f64 * self.opts.block_size) as usize).max(1);
        let mut log_div = vec![0f64; k * nb];
        for blk in 0..n_blocks {
            let lo = blk * per_block;
            if lo >= n {
                break;
            }
            let hi = if blk == n_blocks - 1 { n } else { ((blk + 1) * per_block).min(n) };
            let cells = &order[lo..hi];
            self.move_block(cells, -1.0);
            for c in 0..k {
                for b in 0..nb {
                    let (o, e) = (self.o[c * nb + b], self.e[c * nb + b]);
                    log_div[c * nb + b] = theta * ((2.0 * e + 1.0).ln() - (o + e + 1.0).ln());
                }
            }
            let (dist, batch) = (&self.dist, self.batch);
            let rows: Vec<(usize, Vec<f64>, bool)> = cells
                .par_iter()
                .with_min_len(MIN_PAR_CELLS)
                .map(|&i| {
                    let b = batch[i] as usize;
                    let mut logits: Vec<f64> = (0..k).map(|c| -dist[i * k + c] / sigma + log_div[c * nb + b]).collect();
                    let ok = softmax(&mut logits);
                    (i, logits, ok)
                })
                .collect();
            for (i, row, ok) in rows {
                if !ok {
                    bail!("Harmony: soft cluster assignments of cell {i} underflowed (sigma {sigma}, theta {theta})");
                }
                self.r[i * k..(i + 1) * k].copy_from_slice(&row);
            }
            self.move_block(cells, 1.0);
        }
        Ok(())
    }

    /// Adds (`sign` 1) or removes (−1) the assignments of `cells` to or from O and E.
    fn move_block(&mut self, cells: &[usize], sign: f64) {
        let (k, nb) = (self.k, self.nb);
        let mut totals = vec![0f64; k];
        for &i in cells {
            let b = self.batch[i] as usize;
            for (c, (&v, t)) in self.r[i * k..(i + 1) * k].iter().zip(totals.iter_mut()).enumerate() {
                self.o[c * nb + b] += sign * v;
                *t += v;
            }
        }
        for (c, t) in totals.iter().enumerate() {
            for (b, p) in self.pr_b.iter().enumerate() {
                self.e[c * nb + b] += sign * t * p;
            }
        }
    }

    fn kmeans_converged(&self) -> bool {
        let obj = &self.objective_kmeans;
        let m = obj.len();
        if m <= WINDOW + 1 {
            return false;
        }
        let old: f64 = (0..WINDOW).map(|i| obj[m - 2 - i]).sum();
        let new: f64 = (0..WINDOW).map(|i| obj[m - 1 - i]).sum();
        (old - new).abs() / old.abs() < self.opts.epsilon_cluster
    }

    fn harmony_converged(&self) -> bool {
        let obj = &self.objective_harmony;
        if obj.len() < 2 {
            return false;
        }
        let (old, new) = (obj[obj.len() - 2], obj[obj.len() - 1]);
        if !(old.is_finite() && new.is_finite()) {
            return false;
        }
        if old == 0.0 {
            return new == 0.0;
        }
        // Only a fall counts: a rising objective means the clustering is still moving.
        let delta = (old - new) / old.abs();
        (0.0..self.opts.epsilon_harmony).contains(&delta)
    }

    /// The soft k-means of one Harmony round, from the corrected cells of the last round.
    fn cluster(&mut self) -> Result<()> {
        if self.objective_harmony.len() > 1 {
            self.normalise_z_corr();
            self.assign_without_diversity()?;
            self.rebuild_o_e();
        }
        let mut rounds = 0;
        for i in 0..self.opts.max_iter_kmeans {
            self.update_r()?;
            let obj = self.objective();
            self.objective_kmeans.push(obj);
            rounds = i + 1;
            if i > WINDOW && self.kmeans_converged() {
                break;
            }
        }
        self.kmeans_rounds.push(rounds);
        let last = *self.objective_kmeans.last().expect("at least the initial objective");
        self.objective_harmony.push(last);
        Ok(())
    }

    /// Per cluster, the ridge regression of the original coordinates on the batches, weighted
    /// by the cluster's assignments; each cell then moves by Σ_k R[i, k] · W_k[batch(i)].
    fn moe_correct_ridge(&mut self) -> Result<()> {
        let (n, d, k, nb) = (self.n, self.d, self.k, self.nb);
        let opts = self.opts;
        let (r, z, batch) = (&self.r, &self.z_orig, self.batch);
        let (o, e, batch_size) = (&self.o, &self.e, &self.batch_size);
        // Per cluster: its ridge solution, or None when it corrects nothing.
        let solved: Vec<Result<Option<Ridge>>> = (0..k)
            .into_par_iter()
            .map(|c| {
                // Batches this cluster holds a share of; fewer than 2 leave nothing to regress.
                let keep: Vec<usize> =
                    (0..nb).filter(|&b| batch_size[b] > 0.0 && o[c * nb + b] / batch_size[b] > opts.batch_prop_cutoff).collect();
                if keep.len() < 2 {
                    return Ok(None);
                }
                // R-weighted coordinate sums and weights per batch, in cell order.
                let mut rz = vec![0f64; nb * d];
                let mut w = vec![0f64; nb];
                for i in 0..n {
                    let (b, v) = (batch[i] as usize, r[i * k + c]);
                    w[b] += v;
                    for (s, x) in rz[b * d..(b + 1) * d].iter_mut().zip(&z[i * d..(i + 1) * d]) {
                        *s += v * x;
                    }
                }
                // The system [[Σw, wᵀ], [w, diag(w + λ)]]: an arrowhead. Eliminating the batch
                // rows leaves the intercept's Schur complement s, then each batch row follows.
                let pen = |b: usize| match opts.lambda {
                    Some(l) => l,
                    None => opts.alpha * e[c * nb + b],
                };
                let total: f64 = keep.iter().map(|&b| w[b]).sum();
                let mut s = total;
                let mut rhs0 = vec![0f64; d];
                for &b in &keep {
                    for a in 0..d {
                        rhs0[a] += rz[b * d + a];
                    }
                }
                for &b in &keep {
                    let db = w[b] + pen(b);
                    if db.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                        bail!("Harmony: the ridge system of cluster {c} is singular (batch {b} has weight {} and penalty {})", w[b], pen(b));
                    }
                    s -= w[b] * w[b] / db;
                    for a in 0..d {
                        rhs0[a] -= w[b] / db * rz[b * d + a];
                    }
                }
                // harmonypy's test: a pivot below 1e-10 of the largest diagonal entry.
                if s.partial_cmp(&(1e-10 * total)) != Some(std::cmp::Ordering::Greater) {
                    bail!(
                        "Harmony: the ridge system of cluster {c} is singular; the ridge penalty (lambda {:?}, alpha {}) is zero or too small",
                        opts.lambda,
                        opts.alpha
                    );
                }
                let w0: Vec<f64> = rhs0.iter().map(|v| v / s).collect();
                let mut offsets = vec![0f64; nb * d];
                for &b in &keep {
                    let db = w[b] + pen(b);
                    for a in 0..d {
                        offsets[b * d + a] = (rz[b * d + a] - w[b] * w0[a]) / db;
                    }
                }
                Ok(Some(Ridge { centroid: w0, offsets }))
            })
            .collect();
        let mut offsets: Vec<Option<Vec<f64>>> = vec![None; k];
        for (c, s) in solved.into_iter().enumerate() {
            if let Some(ridge) = s? {
                self.y[c * d..(c + 1) * d].copy_from_slice(&ridge.centroid);
                offsets[c] = Some(ridge.offsets);
            }
        }
        let (r, z) = (&self.r, &self.z_orig);
        self.z_corr.par_chunks_mut(d).enumerate().with_min_len(MIN_PAR_CELLS).for_each(|(i, out)| {
            out.copy_from_slice(&z[i * d..(i + 1) * d]);
            let b = batch[i] as usize;
            for (c, off) in offsets.iter().enumerate() {
                if let Some(off) = off {
                    let v = r[i * k + c];
                    for (o, m) in out.iter_mut().zip(&off[b * d..(b + 1) * d]) {
                        *o -= v * m;
                    }
                }
            }
        });
        self.y.chunks_mut(d).for_each(scale_to_unit);
        Ok(())
    }
}

/// Harmony on `embedding` (row-major cells × `dim`, e.g. PCA scores) with one batch code per
/// cell (0-based; a code without cells is allowed). Returns the corrected embedding.
///
/// With one batch there is nothing to correct: the input comes back unchanged, as from
/// harmonypy. Errors name the problem: non-finite values, a length mismatch, fewer than 2
/// cells, options out of range, or a ridge system made singular by a zero penalty.
pub fn harmonize(embedding: &[f32], dim: usize, batches: &[u32], opts: &HarmonyOptions) -> Result<HarmonyResult> {
    if dim == 0 || !embedding.len().is_multiple_of(dim) {
        bail!("Harmony: {} values do not split into rows of {dim}", embedding.len());
    }
    let n = embedding.len() / dim;
    if batches.len() != n {
        bail!("Harmony: {n} cells but {} batch values", batches.len());
    }
    if n < 2 {
        bail!("Harmony needs at least 2 cells, got {n}");
    }
    if let Some(p) = embedding.iter().position(|v| !v.is_finite()) {
        bail!("Harmony: the embedding has a NaN or infinite value (row {}, column {}); fix or drop those cells first", p / dim, p % dim);
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !(positive(opts.sigma) && opts.theta.is_finite() && opts.theta >= 0.0) {
        bail!("Harmony: sigma must be positive and theta non-negative (got sigma {}, theta {})", opts.sigma, opts.theta);
    }
    if !(opts.block_size > 0.0 && opts.block_size <= 1.0) {
        bail!("Harmony: block_size must be in (0, 1], got {}", opts.block_size);
    }
    if !(opts.alpha.is_finite() && opts.alpha >= 0.0) || opts.lambda.is_some_and(|l| !(l.is_finite() && l >= 0.0)) {
        bail!("Harmony: lambda and alpha must be finite and not negative (got lambda {:?}, alpha {})", opts.lambda, opts.alpha);
    }
    let k = opts.n_clusters.unwrap_or_else(|| default_n_clusters(n));
    if k == 0 || k > n {
        bail!("Harmony: {k} clusters for {n} cells; choose between 1 and the number of cells");
    }
    let nb = batches.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut batch_size = vec![0f64; nb];
    for &b in batches {
        batch_size[b as usize] += 1.0;
    }
    let d = dim;
    let z_orig: Vec<f64> = embedding.iter().map(|&v| v as f64).collect();
    let n_present = batch_size.iter().filter(|&&s| s > 0.0).count();
    if n_present < 2 {
        return Ok(HarmonyResult {
            corrected: embedding.to_vec(),
            dim,
            n_clusters: k,
            n_batches: n_present,
            iterations: 0,
            converged: true,
            objective_harmony: Vec::new(),
            kmeans_rounds: Vec::new(),
        });
    }
    let mut st = State {
        n,
        d,
        k,
        nb,
        batch: batches,
        pr_b: batch_size.iter().map(|s| s / n as f64).collect(),
        batch_size,
        z_corr: z_orig.clone(),
        z_orig,
        y: Vec::new(),
        dist: vec![0f64; n * k],
        r: vec![0f64; n * k],
        o: vec![0f64; k * nb],
        e: vec![0f64; k * nb],
        opts,
        objective_kmeans: Vec::new(),
        objective_harmony: Vec::new(),
        kmeans_rounds: Vec::new(),
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
    };
    st.normalise_z_corr();
    st.y = kmeans_init(&st.z_corr, n, d, k, &mut st.rng);
    st.y.chunks_mut(d).for_each(scale_to_unit);
    st.assign_without_diversity()?;
    st.rebuild_o_e();
    let obj = st.objective();
    st.objective_kmeans.push(obj);
    st.objective_harmony.push(obj);

    let (mut iterations, mut converged) = (0, false);
    for _ in 0..opts.max_iter_harmony {
        st.cluster()?;
        st.moe_correct_ridge()?;
        iterations += 1;
        if st.harmony_converged() {
            converged = true;
            break;
        }
    }
    // max_iter_harmony 0: no correction (z_corr still holds the unit-length cells).
    let corrected = if iterations == 0 { embedding.to_vec() } else { st.z_corr.iter().map(|&v| v as f32).collect() };
    Ok(HarmonyResult {
        corrected,
        dim,
        n_clusters: k,
        n_batches: n_present,
        iterations,
        converged,
        objective_harmony: st.objective_harmony,
        kmeans_rounds: st.kmeans_rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    /// Three cell types (well apart) × two batches; batch 1 is shifted by `shift` in every
    /// dimension. Returns (embedding, dim, types, batches).
    fn planted(n_per: usize, dim: usize, shift: f32, seed: u64) -> (Vec<f32>, usize, Vec<u32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0f32, 1.0).unwrap();
        let centres: Vec<Vec<f32>> = (0..3).map(|t| (0..dim).map(|a| if a % 3 == t { 12.0 } else { -3.0 }).collect()).collect();
        let (mut x, mut types, mut batches) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..3u32 {
            for b in 0..2u32 {
                for _ in 0..n_per {
                    for &m in &centres[t as usize] {
                        x.push(m + noise.sample(&mut rng) + if b == 1 { shift } else { 0.0 });
                    }
                    types.push(t);
                    batches.push(b);
                }
            }
        }
        (x, dim, types, batches)
    }

    /// Mean over types of the distance between the type's two per-batch centroids.
    fn batch_gap(x: &[f32], dim: usize, types: &[u32], batches: &[u32]) -> f64 {
        let mut gaps = 0.0;
        for t in 0..3 {
            let mut m = [vec![0f64; dim], vec![0f64; dim]];
            let mut cnt = [0f64; 2];
            for i in 0..types.len() {
                if types[i] == t {
                    let b = batches[i] as usize;
                    cnt[b] += 1.0;
                    for a in 0..dim {
                        m[b][a] += x[i * dim + a] as f64;
                    }
                }
            }
            gaps += (0..dim).map(|a| (m[0][a] / cnt[0] - m[1][a] / cnt[1]).powi(2)).sum::<f64>().sqrt();
        }
        gaps / 3.0
    }

    #[test]
    fn removes_a_planted_additive_shift() {
        let (x, dim, types, batches) = planted(100, 6, 4.0, 1);
        let before = batch_gap(&x, dim, &types, &batches);
        let h = harmonize(&x, dim, &batches, &HarmonyOptions::default()).unwrap();
        let after = batch_gap(&h.corrected, dim, &types, &batches);
        println!("gap before {before:.3} after {after:.3}, {} iterations, K {}", h.iterations, h.n_clusters);
        assert!((before - 4.0 * (dim as f64).sqrt()).abs() < 0.5, "{before}");
        assert!(after < 0.25 * before, "per-type batch gap {before} -> {after}");
        assert_eq!(h.n_clusters, 20);
        // Cell types stay apart: each type's centroid is far from the others'.
        let centroid = |t: u32| -> Vec<f64> {
            let idx: Vec<usize> = (0..types.len()).filter(|&i| types[i] == t).collect();
            (0..dim).map(|a| idx.iter().map(|&i| h.corrected[i * dim + a] as f64).sum::<f64>() / idx.len() as f64).collect()
        };
        let (c0, c1) = (centroid(0), centroid(1));
        assert!(sq_dist(&c0, &c1).sqrt() > 10.0);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (x, dim, _, batches) = planted(60, 5, 3.0, 2);
        let opts = HarmonyOptions { seed: 7, ..Default::default() };
        let a = harmonize(&x, dim, &batches, &opts).unwrap();
        let b = harmonize(&x, dim, &batches, &opts).unwrap();
        assert_eq!(a.corrected, b.corrected);
        assert_eq!(a.objective_harmony, b.objective_harmony);
        // Another thread count gives the same bits.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let c = pool.install(|| harmonize(&x, dim, &batches, &opts).unwrap());
        assert_eq!(a.corrected, c.corrected);
        // Another seed: another initialisation, a close result.
        let other = harmonize(&x, dim, &batches, &HarmonyOptions { seed: 8, ..Default::default() }).unwrap();
        assert_ne!(a.corrected, other.corrected);
        let diff = a.corrected.iter().zip(&other.corrected).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 2.0, "{diff}");
    }

    #[test]
    fn one_batch_is_returned_unchanged() {
        let (x, dim, _, _) = planted(20, 4, 0.0, 3);
        let batches = vec![0u32; x.len() / dim];
        let h = harmonize(&x, dim, &batches, &HarmonyOptions::default()).unwrap();
        assert_eq!(h.corrected, x);
        assert_eq!(h.iterations, 0);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let opts = HarmonyOptions::default();
        assert!(harmonize(&[1.0, f32::NAN, 2.0, 3.0], 2, &[0, 1], &opts).unwrap_err().to_string().contains("row 0, column 1"));
        assert!(harmonize(&[1.0, 2.0, 3.0], 2, &[0, 1], &opts).is_err());
        assert!(harmonize(&[1.0, 2.0, 3.0, 4.0], 2, &[0], &opts).is_err());
        assert!(harmonize(&[1.0, 2.0, 3.0, 4.0], 2, &[0, 1], &HarmonyOptions { n_clusters: Some(3), ..opts.clone() }).is_err());
        // A zero ridge penalty makes the system singular when the kept batches cover the cluster.
        let (x, dim, _, batches) = planted(30, 4, 2.0, 4);
        let e = harmonize(&x, dim, &batches, &HarmonyOptions { lambda: Some(0.0), ..opts }).unwrap_err();
        assert!(e.to_string().contains("singular"), "{e}");
    }

    #[test]
    fn default_cluster_count_rounds_like_python() {
        assert_eq!(default_n_clusters(700), 23);
        assert_eq!(default_n_clusters(200), 7);
        assert_eq!(default_n_clusters(45), 2); // round(1.5) = 2
        assert_eq!(default_n_clusters(75), 2); // round(2.5) = 2
        assert_eq!(default_n_clusters(5), 1);
        assert_eq!(default_n_clusters(1_000_000), 100);
    }
}
