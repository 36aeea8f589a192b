//! Leiden community detection (Traag, Waltman & van Eck 2019) on a weighted undirected graph,
//! maximising the RB-configuration quality (modularity with a resolution γ):
//!
//!   Q = 1/(2m) Σ_ij (A_ij − γ k_i k_j / (2m)) δ(c_i, c_j)
//!
//! as scanpy's `sc.tl.leiden` (flavor "leidenalg": `RBConfigurationVertexPartition`, edge
//! weights, `n_iterations=-1`) does. scanpy hands leidenalg the connectivities as a directed graph
//! with both directions of every edge; for a symmetric matrix that objective is the same Q.
//!
//! The algorithm follows leidenalg's `Optimiser`: fast local moving of nodes in random order with
//! a queue (an empty community is a candidate), refinement of each community from singletons by
//! greedy merges constrained to the community, aggregation of the refined communities with the
//! unrefined partition as the starting point, repeated until aggregation no longer shrinks the
//! graph; whole iterations repeat until one brings no improvement. Random choices use a seeded
//! ChaCha RNG: the same seed gives the same partition. The random streams differ from
//! leidenalg's, so partitions differ in detail; the tests hold the quality to leidenalg's.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::neighbors::Graph;

/// Moves must improve the quality by more than this (leidenalg: 10·DBL_EPSILON), so rounding
/// noise cannot make a node oscillate.
const MIN_GAIN: f64 = 10.0 * f64::EPSILON;
/// Safety bound on whole iterations; each one strictly improves Q, so it is never reached in
/// practice.
const MAX_ITERATIONS: usize = 1000;

#[derive(Debug, Clone, Copy)]
pub struct LeidenOptions {
    /// γ of the RB-configuration model (scanpy's `resolution`).
    pub resolution: f64,
    pub seed: u64,
    /// Whole iterations; None repeats until an iteration brings no improvement (scanpy's
    /// `n_iterations=-1`).
    pub n_iterations: Option<usize>,
}

impl Default for LeidenOptions {
    fn default() -> Self {
        LeidenOptions { resolution: 1.0, seed: 0, n_iterations: None }
    }
}

/// A graph in the working form: CSR with f64 weights, self-loops (aggregated internal weight)
/// kept apart, node strengths from the original graph.
struct WGraph {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    weights: Vec<f64>,
    /// Weighted degree of each node in the original graph (aggregates: the sum over members).
    strength: Vec<f64>,
}

impl WGraph {
    fn n(&self) -> usize {
        self.strength.len()
    }
    fn from_graph(g: &Graph) -> WGraph {
        let n = g.n();
        let weights: Vec<f64> = g.weights.iter().map(|&w| w as f64).collect();
        let strength = (0..n).map(|i| weights[g.indptr[i]..g.indptr[i + 1]].iter().sum()).collect();
        WGraph { indptr: g.indptr.clone(), indices: g.indices.clone(), weights, strength }
    }
    fn neighbours(&self, v: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        let (a, b) = (self.indptr[v], self.indptr[v + 1]);
        self.indices[a..b].iter().zip(&self.weights[a..b]).map(|(&u, &w)| (u as usize, w))
    }
    /// The graph of the communities of `memb` (ids 0..n_comm): edge weights summed, internal
    /// edges dropped (they do not enter any move's gain), strengths summed.
    fn aggregate(&self, memb: &[usize], n_comm: usize) -> WGraph {
        let mut strength = vec![0f64; n_comm];
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_comm];
        for v in 0..self.n() {
            strength[memb[v]] += self.strength[v];
            members[memb[v]].push(v);
        }
        let mut indptr = vec![0usize];
        let (mut indices, mut weights) = (Vec::new(), Vec::new());
        let mut acc = vec![0f64; n_comm];
        let mut seen: Vec<usize> = Vec::new();
        for (c, mem) in members.iter().enumerate() {
            for &v in mem {
                for (u, w) in self.neighbours(v) {
                    let cu = memb[u];
                    if cu == c {
                        continue;
                    }
                    if acc[cu] == 0.0 {
                        seen.push(cu);
                    }
                    acc[cu] += w;
                }
            }
            seen.sort_unstable();
            for &cu in &seen {
                indices.push(cu as u32);
                weights.push(acc[cu]);
                acc[cu] = 0.0;
            }
            seen.clear();
            indptr.push(indices.len());
        }
        WGraph { indptr, indices, weights, strength }
    }
}

/// Community bookkeeping for moves on one graph.
struct Partition {
    memb: Vec<usize>,
    /// Total strength per community.
    total: Vec<f64>,
    /// Nodes per community.
    size: Vec<usize>,
    /// Community ids with no nodes, for the "empty community" candidate.
    empty: Vec<usize>,
}

impl Partition {
    fn new(g: &WGraph, memb: Vec<usize>) -> Partition {
        let n_comm = memb.iter().copied().max().map_or(0, |m| m + 1).max(g.n());
        let mut total = vec![0f64; n_comm];
        let mut size = vec![0usize; n_comm];
        for (v, &c) in memb.iter().enumerate() {
            total[c] += g.strength[v];
            size[c] += 1;
        }
        let empty = (0..n_comm).rev().filter(|&c| size[c] == 0).collect();
        Partition { memb, total, size, empty }
    }
    fn move_node(&mut self, v: usize, to: usize, strength: f64) {
        let from = self.memb[v];
        if from == to {
            return;
        }
        self.total[from] -= strength;
        self.size[from] -= 1;
        if self.size[from] == 0 {
            self.total[from] = 0.0;
            self.empty.push(from);
        }
        if self.size[to] == 0 {
            if let Some(p) = self.empty.iter().rposition(|&c| c == to) {
                self.empty.swap_remove(p);
            }
        }
        self.total[to] += strength;
        self.size[to] += 1;
        self.memb[v] = to;
    }
    /// Renumbers communities 0..k in order of first appearance; returns k.
    fn compact(&mut self) -> usize {
        let mut map = vec![usize::MAX; self.total.len()];
        let mut k = 0;
        for c in self.memb.iter_mut() {
            if map[*c] == usize::MAX {
                map[*c] = k;
                k += 1;
            }
            *c = map[*c];
        }
        k
    }
}

/// Weights from `v` to each neighbouring community (scratch reused across calls).
struct Scratch {
    w: Vec<f64>,
    listed: Vec<bool>,
    comms: Vec<usize>,
}

impl Scratch {
    fn new(n: usize) -> Scratch {
        Scratch { w: vec![0.0; n], listed: vec![false; n], comms: Vec::new() }
    }
    /// Collects w(v → c) for the communities c of v's neighbours (filtered by `allow`).
    fn collect(&mut self, g: &WGraph, memb: &[usize], v: usize, allow: impl Fn(usize) -> bool) {
        for &c in &self.comms {
            self.w[c] = 0.0;
            self.listed[c] = false;
        }
        self.comms.clear();
        // v's own community is always listed, so staying is weighed with its true weight.
        self.listed[memb[v]] = true;
        self.comms.push(memb[v]);
        for (u, w) in g.neighbours(v) {
            if !allow(u) {
                continue;
            }
            let c = memb[u];
            if !self.listed[c] {
                self.listed[c] = true;
                self.comms.push(c);
            }
            self.w[c] += w;
        }
    }
}

/// Gain (up to the common factor 1/m) of putting `v`, with strength kv, into community c with
/// total strength tot_c (v not counted) and weight w_vc from v.
#[inline]
fn gain(w_vc: f64, kv: f64, tot_c: f64, gamma: f64, two_m: f64) -> f64 {
    w_vc - gamma * kv * tot_c / two_m
}

/// leidenalg's `move_nodes`: visits nodes from a queue (all nodes, shuffled), moves each to the
/// community of best gain, and queues the neighbours that are not in the new community.
fn move_nodes(g: &WGraph, p: &mut Partition, gamma: f64, two_m: f64, rng: &mut ChaCha8Rng) -> f64 {
    let n = g.n();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut queue: std::collections::VecDeque<usize> = order.into();
    let mut queued = vec![true; n];
    let mut sc = Scratch::new(p.total.len());
    let mut improvement = 0.0;
    while let Some(v) = queue.pop_front() {
        queued[v] = false;
        let kv = g.strength[v];
        let from = p.memb[v];
        sc.collect(g, &p.memb, v, |_| true);
        let stay = gain(sc.w[from], kv, p.total[from] - kv, gamma, two_m);
        let (mut best, mut best_gain) = (from, stay);
        for &c in &sc.comms {
            if c == from {
                continue;
            }
            let gc = gain(sc.w[c], kv, p.total[c], gamma, two_m);
            if gc > best_gain + MIN_GAIN {
                best = c;
                best_gain = gc;
            }
        }
        // An empty community: gain 0 (no edges, no strength); only worth it when v is not alone.
        if p.size[from] > 1 && 0.0 > best_gain + MIN_GAIN {
            if let Some(&e) = p.empty.last() {
                best = e;
                best_gain = 0.0;
            }
        }
        if best != from {
            improvement += best_gain - stay;
            p.move_node(v, best, kv);
            for (u, _) in g.neighbours(v) {
                if !queued[u] && p.memb[u] != best {
                    queued[u] = true;
                    queue.push_back(u);
                }
            }
        }
    }
    improvement
}

/// leidenalg's `merge_nodes_constrained`: starting from singletons, each node still alone (in
/// random order) joins the refined community, within its own community of `coarse`, that gains
/// most, if any gains.
fn refine(g: &WGraph, coarse: &[usize], gamma: f64, two_m: f64, rng: &mut ChaCha8Rng) -> Partition {
    let n = g.n();
    let mut r = Partition::new(g, (0..n).collect());
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut sc = Scratch::new(n);
    for v in order {
        let from = r.memb[v];
        if r.size[from] != 1 {
            continue;
        }
        let kv = g.strength[v];
        sc.collect(g, &r.memb, v, |u| coarse[u] == coarse[v]);
        let stay = gain(0.0, kv, 0.0, gamma, two_m);
        let (mut best, mut best_gain) = (from, stay);
        for &c in &sc.comms {
            if c == from {
                continue;
            }
            let gc = gain(sc.w[c], kv, r.total[c], gamma, two_m);
            if gc > best_gain + MIN_GAIN {
                best = c;
                best_gain = gc;
            }
        }
        if best != from {
            r.move_node(v, best, kv);
        }
    }
    r
}

/// One call of leidenalg's `optimise_partition` on the original graph, starting from `memb`;
/// returns the improvement (in units of 1/m).
fn iterate(g0: &WGraph, memb: &mut [usize], gamma: f64, two_m: f64, rng: &mut ChaCha8Rng) -> f64 {
    let mut improvement = 0.0;
    let mut g = None::<WGraph>;
    // node_of[v]: the node of the current (aggregate) graph that original node v belongs to.
    let mut node_of: Vec<usize> = (0..g0.n()).collect();
    let mut p = Partition::new(g0, memb.to_vec());
    loop {
        let cur = g.as_ref().unwrap_or(g0);
        improvement += move_nodes(cur, &mut p, gamma, two_m, rng);
        let n_comm = p.compact();
        // Every node its own community: nothing left to aggregate.
        if n_comm == cur.n() {
            break;
        }
        let mut refined = refine(cur, &p.memb, gamma, two_m, rng);
        let n_ref = refined.compact();
        if n_ref == cur.n() {
            // Refinement merged nothing, so aggregation would not shrink the graph.
            break;
        }
        let next = cur.aggregate(&refined.memb, n_ref);
        // Start the aggregate from the unrefined partition.
        let mut start = vec![0usize; n_ref];
        for v in 0..cur.n() {
            start[refined.memb[v]] = p.memb[v];
        }
        for x in node_of.iter_mut() {
            *x = refined.memb[*x];
        }
        for (v, m) in memb.iter_mut().enumerate() {
            *m = start[node_of[v]];
        }
        p = Partition::new(&next, start);
        g = Some(next);
    }
    for (v, m) in memb.iter_mut().enumerate() {
        *m = p.memb[node_of[v]];
    }
    improvement
}

/// Leiden communities of `graph`: one id per node, numbered by decreasing community size (ties:
/// the community holding the lowest node first), as leidenalg renumbers them.
pub fn leiden(graph: &Graph, opts: &LeidenOptions) -> Vec<u32> {
    let g = WGraph::from_graph(graph);
    let n = g.n();
    let two_m: f64 = g.strength.iter().sum();
    let mut memb: Vec<usize> = (0..n).collect();
    if n == 0 || two_m <= 0.0 {
        return renumber(&memb);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let max_iter = opts.n_iterations.unwrap_or(MAX_ITERATIONS);
    for _ in 0..max_iter {
        let improvement = iterate(&g, &mut memb, opts.resolution, two_m, &mut rng);
        if opts.n_iterations.is_none() && improvement <= 0.0 {
            break;
        }
    }
    renumber(&memb)
}

fn renumber(memb: &[usize]) -> Vec<u32> {
    let k = memb.iter().copied().max().map_or(0, |m| m + 1);
    let mut size = vec![0usize; k];
    let mut first = vec![usize::MAX; k];
    for (v, &c) in memb.iter().enumerate() {
        size[c] += 1;
        first[c] = first[c].min(v);
    }
    let mut comms: Vec<usize> = (0..k).filter(|&c| size[c] > 0).collect();
    comms.sort_by(|&a, &b| size[b].cmp(&size[a]).then(first[a].cmp(&first[b])));
    let mut map = vec![0u32; k];
    for (new, &c) in comms.iter().enumerate() {
        map[c] = new as u32;
    }
    memb.iter().map(|&c| map[c]).collect()
}

/// Modularity with resolution γ of a partition (igraph's `Graph.modularity(membership, weights,
/// resolution)` on the undirected graph): Σ_c [2·w_in(c) − γ K_c² / (2m)] / (2m), where w_in is
/// the weight inside c and K_c the total strength of c.
pub fn modularity(graph: &Graph, memb: &[u32], resolution: f64) -> f64 {
    let n = graph.n();
    let k = memb.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut inside = vec![0f64; k];
    let mut total = vec![0f64; k];
    let mut two_m = 0.0;
    for i in 0..n {
        let (idx, w) = graph.row(i);
        for (&j, &wij) in idx.iter().zip(w) {
            let wij = wij as f64;
            two_m += wij;
            total[memb[i] as usize] += wij;
            if memb[j as usize] == memb[i] {
                inside[memb[i] as usize] += wij;
            }
        }
    }
    if two_m <= 0.0 {
        return f64::NAN;
    }
    (0..k).map(|c| inside[c] - resolution * total[c] * total[c] / two_m).sum::<f64>() / two_m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cliques` cliques of `size` nodes, consecutive cliques joined by one weak edge.
    fn ring_of_cliques(cliques: usize, size: usize) -> Graph {
        let n = cliques * size;
        let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for c in 0..cliques {
            for a in 0..size {
                for b in 0..size {
                    if a != b {
                        rows[c * size + a].push(((c * size + b) as u32, 1.0));
                    }
                }
            }
            let (u, v) = (c * size, ((c + 1) % cliques) * size + 1);
            rows[u].push((v as u32, 0.1));
            rows[v].push((u as u32, 0.1));
        }
        Graph::from_rows(rows)
    }

    #[test]
    fn finds_the_cliques() {
        let g = ring_of_cliques(8, 6);
        let m = leiden(&g, &LeidenOptions::default());
        for c in 0..8 {
            let first = m[c * 6];
            assert!((0..6).all(|a| m[c * 6 + a] == first), "clique {c}: {m:?}");
        }
        let distinct: std::collections::BTreeSet<u32> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 8);
        // The partition is a local optimum: no single move improves Q.
        let q = modularity(&g, &m, 1.0);
        for v in 0..g.n() {
            for c in 0..8u32 {
                let mut m2 = m.clone();
                m2[v] = c;
                assert!(modularity(&g, &m2, 1.0) <= q + 1e-12);
            }
        }
    }

    #[test]
    fn low_resolution_merges_and_seed_is_deterministic() {
        let g = ring_of_cliques(8, 6);
        let opts = LeidenOptions { resolution: 0.01, seed: 3, n_iterations: None };
        let a = leiden(&g, &opts);
        assert_eq!(a, leiden(&g, &opts));
        let distinct: std::collections::BTreeSet<u32> = a.iter().copied().collect();
        assert!(distinct.len() < 8, "{a:?}");
        // Numbered by decreasing size.
        let count = |c: u32| a.iter().filter(|&&x| x == c).count();
        assert!(count(0) >= count(distinct.len() as u32 - 1));
    }

    #[test]
    fn edgeless_graph_gives_singletons() {
        let g = Graph::from_rows(vec![Vec::new(); 4]);
        assert_eq!(leiden(&g, &LeidenOptions::default()), vec![0, 1, 2, 3]);
    }
}
