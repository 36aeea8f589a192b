//! The cell graph scanpy builds with `sc.pp.neighbors(adata, use_rep=..., n_neighbors=15)` and
//! that every graph-based scIB metric (Leiden clustering, graph connectivity, graph LISI) runs on:
//! exact euclidean k-nearest neighbours (the cell itself first) and the UMAP fuzzy simplicial
//! set (`umap.fuzzy_simplicial_set`, which scanpy calls) as symmetric connectivities.
//!
//! Below 8,192 cells scanpy's kNN is exact (scikit-learn brute force); above, it is pynndescent's
//! approximate search. Ours is exact at every size: a blocked brute-force sweep over all pairs
//! whose distances come from f32 matrix products, re-checked in f64 for the few candidates kept.

use anyhow::{bail, Result};
use ndarray::{linalg::general_mat_mul, ArrayView2};
use rayon::prelude::*;

/// scanpy's default `n_neighbors` (the cell itself included).
pub const SCANPY_N_NEIGHBORS: usize = 15;

/// Rows per block of the distance sweep (one rayon task each).
const ROW_BLOCK: usize = 256;
/// Columns per tile: a ROW_BLOCK × COL_TILE f32 product stays in L2.
const COL_TILE: usize = 1024;
/// Extra candidates kept from the f32 sweep and re-ranked with exact f64 distances, so that f32
/// rounding cannot push a true neighbour out of the list.
const KNN_MARGIN: usize = 8;

/// k nearest neighbours per cell, row-major cells × k; column 0 is the cell itself (distance 0),
/// then the others by increasing distance (ties: lower index first).
#[derive(Debug, Clone, PartialEq)]
pub struct Knn {
    pub k: usize,
    pub indices: Vec<u32>,
    pub distances: Vec<f32>,
}

impl Knn {
    pub fn n(&self) -> usize {
        self.indices.len().checked_div(self.k).unwrap_or(0)
    }
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let r = i * self.k..(i + 1) * self.k;
        (&self.indices[r.clone()], &self.distances[r])
    }
}

/// A weighted undirected graph as a symmetric CSR matrix: columns sorted within a row, no
/// self-loops, no stored zeros.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Graph {
    pub fn n(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[i], self.indptr[i + 1]);
        (&self.indices[a..b], &self.weights[a..b])
    }
    /// Builds the graph from per-row lists (each (column, weight) pair must already appear in
    /// both rows); sorts the rows, drops zeros and self-loops.
    pub fn from_rows(rows: Vec<Vec<(u32, f32)>>) -> Graph {
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        indptr.push(0);
        let (mut indices, mut weights) = (Vec::new(), Vec::new());
        for (i, mut r) in rows.into_iter().enumerate() {
            r.sort_by_key(|&(j, _)| j);
            for (j, w) in r {
                if w != 0.0 && j as usize != i {
                    indices.push(j);
                    weights.push(w);
                }
            }
            indptr.push(indices.len());
        }
        Graph { indptr, indices, weights }
    }
}

/// Checks that `x` splits into rows of `dim` finite values; returns the number of rows.
pub fn check_points(x: &[f32], dim: usize, what: &str) -> Result<usize> {
    if dim == 0 || !x.len().is_multiple_of(dim) {
        bail!("{what}: {} values do not split into rows of {dim}", x.len());
    }
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        let bad = x.iter().filter(|v| !v.is_finite()).count();
        bail!(
            "{what}: {bad} NaN or infinite values (first in row {}, column {}); clustering and distances are undefined on them — fix or drop those cells first",
            p / dim,
            p % dim
        );
    }
    Ok(x.len() / dim)
}

/// The number of neighbours scanpy uses for `n` cells: `n_neighbors`, or `1 + n / 2` on "very
/// small datasets" where `n_neighbors > n`.
pub fn effective_k(n: usize, n_neighbors: usize) -> usize {
    if n_neighbors > n {
        1 + n / 2
    } else {
        n_neighbors
    }
}

/// One brute-force pass over all pairwise euclidean distances of `x` (row-major, `dim` per row).
///
/// For each row `i` it hands `finish` (a) per-segment sums of the distances from `i`, where
/// `segments` are the boundaries `[s0 = 0, s1, ..., n]` of contiguous column ranges (empty: no
/// sums), and (b) up to `n_cand` candidate nearest rows as (approximate squared distance, index),
/// sorted by increasing distance. The distance from a row to itself counts as exactly 0, as
/// scikit-learn zeroes the diagonal.
///
/// Distances come from `|x|² + |y|² − 2 x·y` with the dot products from f32 matrix products on
/// the centred data (centring leaves distances unchanged and shrinks the norms, hence the
/// cancellation error); sums accumulate in f64. The cost is n² × dim multiply-adds, once.
pub(crate) fn sweep<T: Send>(
    x: &[f32],
    dim: usize,
    segments: &[usize],
    n_cand: usize,
    finish: impl Fn(usize, &[f64], &[(f32, u32)]) -> T + Sync,
) -> Vec<T> {
    let n = x.len() / dim;
    let n_seg = segments.len().saturating_sub(1);
    let mut mean = vec![0f64; dim];
    for r in x.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    // Sized up front: at 100k × 512 a doubling Vec would briefly hold twice the 200 MB.
    let mut xc = Vec::with_capacity(x.len());
    for r in x.chunks_exact(dim) {
        xc.extend(r.iter().zip(&mean).map(|(&v, &m)| (v as f64 - m) as f32));
    }
    let norms: Vec<f32> = xc.chunks_exact(dim).map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32).collect();
    let xv = ArrayView2::from_shape((n, dim), &xc).expect("rows of dim");

    let blocks: Vec<usize> = (0..n).step_by(ROW_BLOCK).collect();
    let per_block: Vec<Vec<T>> = blocks
        .into_par_iter()
        .map(|r0| {
            let r1 = (r0 + ROW_BLOCK).min(n);
            let rows = r1 - r0;
            let xr = xv.slice(ndarray::s![r0..r1, ..]);
            let mut sums = vec![0f64; rows * n_seg];
            let mut cands: Vec<Vec<(f32, u32)>> = (0..rows).map(|_| Vec::with_capacity(n_cand + 1)).collect();
            let mut tile = ndarray::Array2::<f32>::zeros((rows, COL_TILE.min(n)));
            for c0 in (0..n).step_by(COL_TILE) {
                let c1 = (c0 + COL_TILE).min(n);
                let xt = xv.slice(ndarray::s![c0..c1, ..]);
                let mut g = tile.slice_mut(ndarray::s![.., ..c1 - c0]);
                general_mat_mul(-2.0, &xr, &xt.t(), 0.0, &mut g);
                for r in 0..rows {
                    let i = r0 + r;
                    let mut row = g.row_mut(r);
                    let d2 = row.as_slice_mut().expect("a standard-layout tile");
                    let ni = norms[i];
                    for (v, &nj) in d2.iter_mut().zip(&norms[c0..c1]) {
                        *v = (*v + ni + nj).max(0.0);
                    }
                    if (c0..c1).contains(&i) {
                        d2[i - c0] = 0.0;
                    }
                    if n_cand > 0 {
                        add_candidates(&mut cands[r], d2, c0, n_cand);
                    }
                    if n_seg > 0 {
                        let s = &mut sums[r * n_seg..(r + 1) * n_seg];
                        // Segments overlapping [c0, c1): the first is found by binary search.
                        let mut k = segments.partition_point(|&b| b <= c0).saturating_sub(1);
                        while k < n_seg && segments[k] < c1 {
                            let (a, b) = (segments[k].max(c0), segments[k + 1].min(c1));
                            if a < b {
                                s[k] += sqrt_sum(&d2[a - c0..b - c0]);
                            }
                            k += 1;
                        }
                    }
                }
            }
            (0..rows).map(|r| finish(r0 + r, &sums[r * n_seg..(r + 1) * n_seg], &cands[r])).collect()
        })
        .collect();
    per_block.into_iter().flatten().collect()
}

/// Σ sqrt(d2) in f64, in four lanes so the loop vectorises.
fn sqrt_sum(d2: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = d2.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..4 {
            acc[l] += (c[l] as f64).sqrt();
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &v in tail {
        s += (v as f64).sqrt();
    }
    s
}

/// Merges the columns of one tile into a row's sorted candidate list (at most `cap` entries).
fn add_candidates(list: &mut Vec<(f32, u32)>, d2: &[f32], c0: usize, cap: usize) {
    for (off, &v) in d2.iter().enumerate() {
        if list.len() == cap && v >= list[cap - 1].0 {
            continue;
        }
        let j = (c0 + off) as u32;
        let pos = list.partition_point(|&(d, k)| d < v || (d == v && k < j));
        list.insert(pos, (v, j));
        list.truncate(cap);
    }
}

/// Exact squared distance in f64 (the f32 inputs' differences are exact in f64).
pub(crate) fn exact_d2(x: &[f32], dim: usize, i: usize, j: usize) -> f64 {
    let (a, b) = (&x[i * dim..(i + 1) * dim], &x[j * dim..(j + 1) * dim]);
    a.iter().zip(b).map(|(&p, &q)| (p as f64 - q as f64).powi(2)).sum()
}

/// The `k` nearest rows of row `i` from its sweep candidates, re-ranked by exact distance:
/// `i` itself first, then by distance, ties by index.
pub(crate) fn knn_row(x: &[f32], dim: usize, i: usize, cands: &[(f32, u32)], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut exact: Vec<(f64, u32)> =
        cands.iter().filter(|&&(_, j)| j as usize != i).map(|&(_, j)| (exact_d2(x, dim, i, j as usize), j)).collect();
    exact.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut idx = Vec::with_capacity(k);
    let mut dist = Vec::with_capacity(k);
    idx.push(i as u32);
    dist.push(0.0);
    for &(d2, j) in exact.iter().take(k - 1) {
        idx.push(j);
        dist.push(d2.sqrt() as f32);
    }
    (idx, dist)
}

/// Exact euclidean kNN of the rows of `x` (`dim` values each), `k` neighbours including the cell
/// itself, as scanpy's `sc.pp.neighbors(n_neighbors=k)` (`k` is first reduced to `1 + n/2` when
/// it exceeds the number of cells, as scanpy does).
pub fn exact_knn(x: &[f32], dim: usize, k: usize) -> Result<Knn> {
    let n = check_points(x, dim, "kNN")?;
    if n < 2 || k < 2 {
        bail!("kNN needs at least 2 cells and k >= 2 (got {n} cells, k = {k})");
    }
    let k = effective_k(n, k);
    let rows = sweep(x, dim, &[], (k + KNN_MARGIN).min(n), |i, _, c| knn_row(x, dim, i, c, k));
    let mut knn = Knn { k, indices: Vec::with_capacity(n * k), distances: Vec::with_capacity(n * k) };
    for (idx, dist) in rows {
        knn.indices.extend(idx);
        knn.distances.extend(dist);
    }
    Ok(knn)
}

// umap-learn's constants (umap/umap_.py).
const SMOOTH_K_TOLERANCE: f64 = 1e-5;
const MIN_K_DIST_SCALE: f32 = 1e-3;
const N_ITER: usize = 64;

/// umap's `smooth_knn_dist` with local_connectivity = 1 and bandwidth = 1, for one row of sorted
/// kNN distances (self first). umap declares psum, lo, mid and hi float32 in numba, so the
/// search runs in f32 here too; that keeps sigma, and so the connectivities, equal to umap's to
/// within an ulp or two. Returns (sigma, rho).
fn smooth_knn_row(d: &[f32], mean_all: f32) -> (f32, f32) {
    let k = d.len();
    let target = (k as f64).log2();
    let non_zero: Vec<f32> = d.iter().copied().filter(|&v| v > 0.0).collect();
    // local_connectivity 1: rho is the first non-zero distance.
    let rho = non_zero.first().copied().unwrap_or(0.0);
    let (mut lo, mut hi, mut mid) = (0f32, f32::MAX, 1f32);
    for _ in 0..N_ITER {
        let mut psum = 0f32;
        for &v in &d[1..] {
            let dd = v - rho;
            psum += if dd > 0.0 { (-(dd / mid)).exp() } else { 1.0 };
        }
        if ((psum as f64) - target).abs() < SMOOTH_K_TOLERANCE {
            break;
        }
        if (psum as f64) > target {
            hi = mid;
            mid = ((lo as f64 + hi as f64) / 2.0) as f32;
        } else {
            lo = mid;
            if hi >= f32::MAX {
                mid *= 2.0;
            } else {
                mid = ((lo as f64 + hi as f64) / 2.0) as f32;
            }
        }
    }
    let mut sigma = mid;
    // umap's floor on sigma: a small fraction of the mean distance (of the row when rho > 0,
    // of the whole kNN matrix otherwise).
    if rho > 0.0 {
        let mean_row = (d.iter().map(|&v| v as f64).sum::<f64>() / k as f64) as f32;
        sigma = sigma.max(MIN_K_DIST_SCALE * mean_row);
    } else {
        sigma = sigma.max(MIN_K_DIST_SCALE * mean_all);
    }
    (sigma, rho)
}

/// scanpy's UMAP connectivities of a kNN graph (`umap.fuzzy_simplicial_set`, set_op_mix_ratio 1,
/// local_connectivity 1): membership exp(−(d − rho)/sigma) per directed kNN edge, then the fuzzy
/// union w = a + b − a·b of the two directions, in f32 as umap and scipy compute it.
pub fn umap_connectivities(knn: &Knn) -> Graph {
    let (n, k) = (knn.n(), knn.k);
    let mean_all = (knn.distances.iter().map(|&v| v as f64).sum::<f64>() / knn.distances.len().max(1) as f64) as f32;
    // Directed memberships, rows sorted by column for the look-ups below.
    let directed: Vec<Vec<(u32, f32)>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (idx, d) = knn.row(i);
            let (sigma, rho) = smooth_knn_row(d, mean_all);
            let mut row: Vec<(u32, f32)> = idx
                .iter()
                .zip(d)
                .filter(|&(&j, _)| j as usize != i)
                .map(|(&j, &dj)| {
                    let v = if dj - rho <= 0.0 || sigma == 0.0 { 1.0 } else { (-((dj - rho) / sigma)).exp() };
                    (j, v)
                })
                .filter(|&(_, v)| v != 0.0)
                .collect();
            row.sort_by_key(|&(j, _)| j);
            row.dedup_by_key(|&mut (j, _)| j);
            row
        })
        .collect();
    let lookup = |i: usize, j: u32| -> Option<f32> {
        let r = &directed[i];
        r.binary_search_by_key(&j, |&(c, _)| c).ok().map(|p| r[p].1)
    };
    let mut rows: Vec<Vec<(u32, f32)>> = (0..n).map(|i| Vec::with_capacity(directed[i].len() + k)).collect();
    for i in 0..n {
        for &(j, a) in &directed[i] {
            match lookup(j as usize, i as u32) {
                Some(b) => rows[i].push((j, (a + b) - a * b)),
                None => {
                    // Only i → j exists: the union is a, in both rows.
                    rows[i].push((j, a));
                    rows[j as usize].push((i as u32, a));
                }
            }
        }
    }
    Graph::from_rows(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_points(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim).map(|i| rng.random::<f32>() * 4.0 + (i / dim % 3) as f32 * 3.0).collect()
    }

    #[test]
    fn knn_matches_a_plain_scan() {
        // More than one row block and column tile, so the tiling is exercised.
        let (n, dim, k) = (1300, 7, 15);
        let x = random_points(n, dim, 3);
        let knn = exact_knn(&x, dim, k).unwrap();
        for i in (0..n).step_by(37) {
            let mut all: Vec<(f64, u32)> = (0..n).filter(|&j| j != i).map(|j| (exact_d2(&x, dim, i, j), j as u32)).collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let (idx, d) = knn.row(i);
            assert_eq!(idx[0], i as u32);
            assert_eq!(d[0], 0.0);
            let want: Vec<u32> = all[..k - 1].iter().map(|p| p.1).collect();
            assert_eq!(&idx[1..], &want[..], "row {i}");
            for (m, &(d2, _)) in all[..k - 1].iter().enumerate() {
                assert_eq!(d[m + 1], d2.sqrt() as f32);
            }
        }
    }

    #[test]
    fn segment_sums_match_direct_sums() {
        let (n, dim) = (1100, 5);
        let x = random_points(n, dim, 9);
        let segs = [0, 10, 11, 600, 1050, 1100];
        let out = sweep(&x, dim, &segs, 0, |i, s, _| (i, s.to_vec()));
        for (i, s) in out.iter().step_by(53) {
            for k in 0..segs.len() - 1 {
                let want: f64 = (segs[k]..segs[k + 1]).filter(|&j| j != *i).map(|j| exact_d2(&x, dim, *i, j).sqrt()).sum();
                assert!((s[k] - want).abs() <= 1e-5 * want.max(1.0), "row {i} seg {k}: {} vs {want}", s[k]);
            }
        }
    }

    #[test]
    fn tiny_inputs_shrink_k_like_scanpy() {
        let x = [0.0f32, 0.0, 1.0, 0.0, 0.0, 2.0, 5.0, 5.0];
        let knn = exact_knn(&x, 2, 15).unwrap();
        assert_eq!(knn.k, 3);
        assert_eq!(knn.row(0).0, &[0, 1, 2]);
        assert!(exact_knn(&[1.0, f32::NAN], 1, 2).is_err());
        assert!(exact_knn(&[1.0, 2.0, 3.0], 2, 2).is_err());
    }

    #[test]
    fn connectivities_are_a_symmetric_fuzzy_union() {
        let (n, dim) = (300, 4);
        let x = random_points(n, dim, 5);
        let g = umap_connectivities(&exact_knn(&x, dim, 15).unwrap());
        assert_eq!(g.n(), n);
        for i in 0..n {
            let (idx, w) = g.row(i);
            assert!(idx.windows(2).all(|p| p[0] < p[1]));
            for (&j, &wij) in idx.iter().zip(w) {
                assert!(wij > 0.0 && wij <= 1.0);
                let (jdx, jw) = g.row(j as usize);
                let p = jdx.binary_search(&(i as u32)).expect("symmetric");
                assert_eq!(jw[p], wij);
            }
        }
    }
}
