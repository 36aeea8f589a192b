//! scIB's graph LISI (`scib.metrics.lisi_graph_py`, scib 1.1.7), the Local Inverse Simpson's
//! Index of Korsunsky et al. 2019 computed on the kNN graph instead of on an embedding:
//!
//! 1. each cell's `k0 = 90` nearest cells by shortest path on the connectivities graph, with the
//!    connectivity values themselves as the edge lengths (scib's `knn_graph.cpp`, a Dijkstra
//!    search; a cell whose component has fewer than 90 other cells gets LISI 1, as scib does);
//! 2. on those path lengths D, a Gaussian kernel exp(−βD) whose entropy matches perplexity
//!    `floor(k0 / 3) = 30` (bisection on β from 1, tolerance 1e-5, at most 50 steps);
//! 3. Simpson's index Σ_b (Σ_{j ∈ b} p_j)² of the kernel weights over the groups (batches for
//!    iLISI, labels for cLISI), and LISI = its inverse. When every weight underflows scib stores
//!    a Simpson index of −1, so LISI −1; kept here, as it enters scib's median.
//!
//! Differences from scib: scib passes the graph to its C++ helper as text and reads the path
//! lengths back with 6 significant digits; here they stay f64 (per-cell values agree to ~1e-5).
//! `scib.metrics.metrics` subsamples 50% of the cells with an unseeded RNG; here every cell is
//! scored, as `ilisi_graph` / `clisi_graph` do by default.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::neighbors::Graph;

/// scib's `k0`.
pub const K0: usize = 90;
const TOL: f64 = 1e-5;
const MAX_TRIES: usize = 50;

/// Per-cell LISI for each grouping, plus the cells scib treats specially.
#[derive(Debug, Clone)]
pub struct GraphLisi {
    /// One vector of per-cell LISI values per grouping passed in.
    pub per_cell: Vec<Vec<f64>>,
    /// Cells with fewer than k0 other cells reachable (LISI 1, as scib).
    pub n_short: usize,
    /// Cells whose kernel weights all underflowed (LISI −1, as scib).
    pub n_degenerate: usize,
}

#[derive(PartialEq)]
struct Item(f64, u32);
impl Eq for Item {}
impl Ord for Item {
    // Reversed: BinaryHeap is a max-heap and Dijkstra needs the smallest distance.
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Per-thread Dijkstra state, reset lazily by a generation stamp.
struct Search {
    dist: Vec<f64>,
    seen: Vec<u32>,
    done: Vec<u32>,
    stamp: u32,
    heap: BinaryHeap<Item>,
}

impl Search {
    fn new(n: usize) -> Search {
        Search { dist: vec![0.0; n], seen: vec![0; n], done: vec![0; n], stamp: 0, heap: BinaryHeap::new() }
    }

    /// The `k` nearest other nodes of `src` by path length: (node, length) by increasing length.
    fn nearest(&mut self, g: &Graph, src: usize, k: usize, out: &mut Vec<(u32, f64)>) {
        out.clear();
        self.stamp += 1;
        let s = self.stamp;
        self.heap.clear();
        self.dist[src] = 0.0;
        self.seen[src] = s;
        self.heap.push(Item(0.0, src as u32));
        while let Some(Item(d, v)) = self.heap.pop() {
            let v = v as usize;
            if self.done[v] == s || d > self.dist[v] {
                continue;
            }
            self.done[v] = s;
            if v != src {
                out.push((v as u32, d));
                if out.len() >= k {
                    break;
                }
            }
            let (idx, w) = g.row(v);
            for (&u, &wu) in idx.iter().zip(w) {
                let u = u as usize;
                if self.done[u] == s {
                    continue;
                }
                let nd = d + wu as f64;
                if self.seen[u] != s || nd < self.dist[u] {
                    self.seen[u] = s;
                    self.dist[u] = nd;
                    self.heap.push(Item(nd, u as u32));
                }
            }
        }
    }
}

/// scib's `Hbeta`: entropy and normalised weights of exp(−βD).
fn hbeta(d: &[f64], beta: f64, p: &mut [f64]) -> f64 {
    let mut sum = 0.0;
    for (pi, &di) in p.iter_mut().zip(d) {
        *pi = (-di * beta).exp();
        sum += *pi;
    }
    if sum == 0.0 {
        p.iter_mut().for_each(|v| *v = 0.0);
        return 0.0;
    }
    let dp: f64 = d.iter().zip(p.iter()).map(|(a, b)| a * b).sum();
    let h = sum.ln() + beta * dp / sum;
    p.iter_mut().for_each(|v| *v /= sum);
    h
}

/// The kernel weights of one cell's neighbour path lengths at perplexity `perplexity` (scib's
/// β search in `compute_simpson_index_graph`); None when they all underflow (H = 0).
fn kernel(d: &[f64], perplexity: f64) -> Option<Vec<f64>> {
    let log_u = perplexity.ln();
    let mut p = vec![0f64; d.len()];
    let (mut beta, mut betamin, mut betamax) = (1.0f64, f64::NEG_INFINITY, f64::INFINITY);
    let mut h = hbeta(d, beta, &mut p);
    let mut diff = h - log_u;
    let mut tries = 0;
    while diff.abs() > TOL && tries < MAX_TRIES {
        if diff > 0.0 {
            betamin = beta;
            beta = if betamax == f64::INFINITY { beta * 2.0 } else { (beta + betamax) / 2.0 };
        } else {
            betamax = beta;
            beta = if betamin == f64::NEG_INFINITY { beta / 2.0 } else { (beta + betamin) / 2.0 };
        }
        h = hbeta(d, beta, &mut p);
        diff = h - log_u;
        tries += 1;
    }
    if h == 0.0 {
        None
    } else {
        Some(p)
    }
}

/// Per-cell graph LISI of each grouping (`(codes, n_groups)`, one code per cell) on `graph`,
/// with `k0` neighbours and perplexity floor(k0 / 3).
pub fn graph_lisi(graph: &Graph, groupings: &[(&[u32], usize)], k0: usize) -> Result<GraphLisi> {
    let n = graph.n();
    if k0 == 0 {
        bail!("LISI needs k0 >= 1");
    }
    for (codes, n_groups) in groupings {
        if codes.len() != n || codes.iter().any(|&c| c as usize >= *n_groups) {
            bail!("LISI: a grouping has {} codes for {n} cells or a code out of range", codes.len());
        }
    }
    let perplexity = (k0 / 3) as f64;
    // Per cell: one LISI per grouping; 1 for short cells, -1 for degenerate ones (scib's values).
    let rows: Vec<(Vec<f64>, bool, bool)> = (0..n)
        .into_par_iter()
        .map_init(
            || (Search::new(n), Vec::with_capacity(k0)),
            |(search, near), i| {
                search.nearest(graph, i, k0, near);
                if near.len() < k0 {
                    return (vec![1.0; groupings.len()], true, false);
                }
                let d: Vec<f64> = near.iter().map(|&(_, l)| l).collect();
                let Some(p) = kernel(&d, perplexity) else {
                    return (vec![-1.0; groupings.len()], false, true);
                };
                let lisi = groupings
                    .iter()
                    .map(|(codes, n_groups)| {
                        let mut mass = vec![0f64; *n_groups];
                        for (&(j, _), &pj) in near.iter().zip(&p) {
                            mass[codes[j as usize] as usize] += pj;
                        }
                        1.0 / mass.iter().map(|m| m * m).sum::<f64>()
                    })
                    .collect();
                (lisi, false, false)
            },
        )
        .collect();
    let mut per_cell = vec![Vec::with_capacity(n); groupings.len()];
    let (mut n_short, mut n_degenerate) = (0, 0);
    for (v, short, degenerate) in rows {
        for (dst, x) in per_cell.iter_mut().zip(v) {
            dst.push(x);
        }
        n_short += short as usize;
        n_degenerate += degenerate as usize;
    }
    Ok(GraphLisi { per_cell, n_short, n_degenerate })
}

/// numpy's median (mean of the two middle values for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_graph(n: usize, w: f32) -> Graph {
        let rows = (0..n)
            .map(|i| {
                let mut r = Vec::new();
                if i > 0 {
                    r.push(((i - 1) as u32, w));
                }
                if i + 1 < n {
                    r.push(((i + 1) as u32, w));
                }
                r
            })
            .collect();
        Graph::from_rows(rows)
    }

    #[test]
    fn dijkstra_orders_by_path_length() {
        let g = path_graph(10, 0.5);
        let mut s = Search::new(10);
        let mut out = Vec::new();
        s.nearest(&g, 4, 4, &mut out);
        let lens: Vec<f64> = out.iter().map(|p| p.1).collect();
        assert_eq!(lens, vec![0.5, 0.5, 1.0, 1.0]);
        let nodes: std::collections::BTreeSet<u32> = out.iter().map(|p| p.0).collect();
        assert_eq!(nodes, [2, 3, 5, 6].into_iter().collect());
    }

    #[test]
    fn kernel_hits_the_perplexity() {
        let d: Vec<f64> = (0..90).map(|i| 0.1 + i as f64 * 0.05).collect();
        let p = kernel(&d, 30.0).unwrap();
        let h: f64 = -p.iter().filter(|&&x| x > 0.0).map(|x| x * x.ln()).sum::<f64>();
        assert!((h - 30f64.ln()).abs() < 1e-4, "{h}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn mixed_groups_score_near_the_group_count() {
        // A long path whose cells alternate between 2 groups: the neighbourhoods are mixed.
        let g = path_graph(400, 0.2);
        let alt: Vec<u32> = (0..400).map(|i| (i % 2) as u32).collect();
        let one: Vec<u32> = vec![0; 400];
        let r = graph_lisi(&g, &[(&alt, 2), (&one, 1)], 90).unwrap();
        assert_eq!(r.n_short, 0);
        let m = median(&r.per_cell[0]);
        assert!((m - 2.0).abs() < 0.05, "{m}");
        assert!(r.per_cell[1].iter().all(|&v| (v - 1.0).abs() < 1e-12));
        // Fewer than k0 reachable cells: LISI 1, counted.
        let small = path_graph(20, 0.2);
        let codes: Vec<u32> = (0..20).map(|i| (i % 2) as u32).collect();
        let r = graph_lisi(&small, &[(&codes, 2)], 90).unwrap();
        assert_eq!(r.n_short, 20);
        assert!(r.per_cell[0].iter().all(|&v| v == 1.0));
    }

    #[test]
    fn median_is_numpys() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
