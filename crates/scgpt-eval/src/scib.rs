//! scIB integration metrics as scib 1.1.7 defines them (`scib.metrics.metrics`, which the scGPT
//! integration tutorial calls with NMI, ARI, silhouettes, PCR and graph connectivity on), plus
//! scib's graph iLISI/cLISI:
//!
//! - `NMI_cluster/label`, `ARI_cluster/label`: Leiden clustering of the kNN graph at the
//!   resolution of scib's grid (`get_resolutions(n=10, max=2)`: 0.2, 0.4, …, 2.0; scib ≥ 1.1.6,
//!   before it Louvain at 0.1…2.0) that maximises NMI; NMI is scikit-learn's
//!   `normalized_mutual_info_score` (arithmetic mean), ARI scib's own pair-counting formula.
//! - `ASW_label` = (silhouette_score(embedding, label) + 1) / 2, euclidean.
//! - `ASW_label/batch`: per label seen in more than one batch (and not one batch per cell), the
//!   silhouette of the label's cells against their batches, scored 1 − |s| and averaged in the
//!   label; then the mean over those labels.
//! - `graph_conn`: per label, the largest connected component of the label's subgraph of the
//!   connectivities over the label's size; mean over labels.
//! - `PCR_batch`: see [`crate::pcr`]; `iLISI` / `cLISI`: see [`crate::lisi`], scaled as scib
//!   scales them: (median − 1)/(batches − 1) and (labels − median)/(labels − 1).
//! - `avg_bio` = mean(NMI, ARI, ASW_label); `avg_batch` = mean(ASW_label/batch, graph_conn)
//!   (the aggregates of the scGPT notebooks).
//!
//! A metric that is undefined on the input (one batch, one label, ...) is `None` with a note.
//! The kNN and all silhouettes come from one pass over the pairwise distances.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::leiden::{leiden, modularity, LeidenOptions};
use crate::lisi::{graph_lisi, median, K0};
use crate::neighbors::{check_points, effective_k, knn_row, sweep, umap_connectivities, Graph, Knn, SCANPY_N_NEIGHBORS};
use crate::pcr::{pc_regression, pc_regression_precomputed, Features, PcRegression};

/// scib 1.1.7's resolution grid: `get_resolutions(n=10, max=2)`, i.e. 2·(i+1)/10.
pub fn scib_resolutions() -> Vec<f64> {
    (1..=10).map(|i| (2 * i) as f64 / 10.0).collect()
}

/// Sorted distinct values and each value's code in that list (pandas' categorical codes).
pub fn codes<S: AsRef<str>>(values: &[S]) -> (Vec<u32>, Vec<String>) {
    let mut names: Vec<String> = values.iter().map(|v| v.as_ref().to_string()).collect();
    names.sort();
    names.dedup();
    let c = values.iter().map(|v| names.binary_search_by(|n| n.as_str().cmp(v.as_ref())).unwrap_or(0) as u32).collect();
    (c, names)
}

fn n_codes(c: &[u32]) -> usize {
    c.iter().copied().max().map_or(0, |m| m as usize + 1)
}

/// Dense contingency table rows × cols (cluster × label).
fn contingency(a: &[u32], b: &[u32]) -> (Vec<f64>, usize, usize) {
    let (ra, cb) = (n_codes(a), n_codes(b));
    let mut t = vec![0f64; ra * cb];
    for (&x, &y) in a.iter().zip(b) {
        t[x as usize * cb + y as usize] += 1.0;
    }
    (t, ra, cb)
}

fn entropy(counts: &[f64]) -> f64 {
    let nz: Vec<f64> = counts.iter().copied().filter(|&c| c > 0.0).collect();
    if nz.len() <= 1 {
        return 0.0;
    }
    let s: f64 = nz.iter().sum();
    -nz.iter().map(|&c| (c / s) * (c.ln() - s.ln())).sum::<f64>()
}

/// scikit-learn's `normalized_mutual_info_score(a, b, average_method="arithmetic")` on codes.
pub fn nmi(a: &[u32], b: &[u32]) -> f64 {
    let (t, ra, cb) = contingency(a, b);
    let row: Vec<f64> = (0..ra).map(|i| t[i * cb..(i + 1) * cb].iter().sum()).collect();
    let col: Vec<f64> = (0..cb).map(|j| (0..ra).map(|i| t[i * cb + j]).sum()).collect();
    let (nr, nc) = (row.iter().filter(|&&v| v > 0.0).count(), col.iter().filter(|&&v| v > 0.0).count());
    // Both labellings unsplit (or empty): a perfect match by scikit-learn's convention.
    if nr == nc && nr <= 1 {
        return 1.0;
    }
    if nr == 1 || nc == 1 {
        return 0.0;
    }
    let n: f64 = row.iter().sum();
    let mut mi = 0.0;
    for i in 0..ra {
        for j in 0..cb {
            let v = t[i * cb + j];
            if v > 0.0 {
                let term = (v / n) * (v.ln() - n.ln()) + (v / n) * (-(row[i] * col[j]).ln() + n.ln() + n.ln());
                // scikit-learn zeroes terms below machine epsilon.
                if term.abs() >= f64::EPSILON {
                    mi += term;
                }
            }
        }
    }
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return 0.0;
    }
    mi / ((entropy(&row) + entropy(&col)) / 2.0)
}

/// scib's ARI (`scib.metrics.ari`, native implementation): None when undefined (0/0, e.g. one
/// cluster and one label).
pub fn ari(a: &[u32], b: &[u32]) -> Option<f64> {
    let (t, ra, cb) = contingency(a, b);
    let binom = |x: f64| x * (x - 1.0) / 2.0;
    let n = a.len() as f64;
    let rows: f64 = (0..ra).map(|i| binom(t[i * cb..(i + 1) * cb].iter().sum())).sum();
    let cols: f64 = (0..cb).map(|j| binom((0..ra).map(|i| t[i * cb + j]).sum())).sum();
    let index: f64 = t.iter().map(|&v| binom(v)).sum();
    let expected = rows * cols / binom(n);
    let max = 0.5 * (rows + cols);
    let r = (index - expected) / (max - expected);
    r.is_finite().then_some(r)
}

/// scib's `graph_connectivity`: mean over labels of |largest connected component of the label's
/// subgraph| / |label|.
pub fn graph_connectivity(g: &Graph, labels: &[u32]) -> f64 {
    let n = g.n();
    let mut parent: Vec<u32> = (0..n as u32).collect();
    fn find(p: &mut [u32], mut x: u32) -> u32 {
        while p[x as usize] != x {
            p[x as usize] = p[p[x as usize] as usize];
            x = p[x as usize];
        }
        x
    }
    for i in 0..n {
        let (idx, _) = g.row(i);
        for &j in idx {
            if labels[j as usize] == labels[i] {
                let (a, b) = (find(&mut parent, i as u32), find(&mut parent, j));
                if a != b {
                    parent[a.max(b) as usize] = a.min(b);
                }
            }
        }
    }
    let k = n_codes(labels);
    let mut size = vec![0usize; k];
    let mut comp = vec![0usize; n];
    for i in 0..n {
        size[labels[i] as usize] += 1;
        comp[find(&mut parent, i as u32) as usize] += 1;
    }
    let mut largest = vec![0usize; k];
    for i in 0..n {
        if parent[i] == i as u32 {
            let l = labels[i] as usize;
            largest[l] = largest[l].max(comp[i]);
        }
    }
    let present: Vec<usize> = (0..k).filter(|&l| size[l] > 0).collect();
    present.iter().map(|&l| largest[l] as f64 / size[l] as f64).sum::<f64>() / present.len() as f64
}

/// The kNN graph and the silhouettes, from one pass over all pairwise distances.
#[derive(Debug, Clone)]
pub struct DistanceMetrics {
    pub knn: Knn,
    /// scikit-learn's `silhouette_samples(embedding, labels)` per cell.
    pub label_silhouettes: Vec<f64>,
    /// Per cell, 1 − |silhouette against the batches of its label's cells|; None for cells of
    /// labels scib skips (one batch, or one batch per cell).
    pub batch_scores: Vec<Option<f64>>,
}

fn silhouette(a: f64, b: f64) -> f64 {
    let s = (b - a) / a.max(b);
    // numpy's nan_to_num as scikit-learn applies it: a one-cell cluster (0/0) scores 0.
    if s.is_finite() {
        s
    } else {
        0.0
    }
}

/// kNN (`k` including the cell itself) and silhouettes of `x` (`dim` per row) by label and by
/// batch within label (codes per cell).
pub fn distance_metrics(x: &[f32], dim: usize, labels: &[u32], batches: &[u32], k: usize) -> Result<DistanceMetrics> {
    let n = check_points(x, dim, "embedding")?;
    if labels.len() != n || batches.len() != n {
        bail!("{n} cells but {} labels and {} batches", labels.len(), batches.len());
    }
    if n < 3 {
        bail!("integration metrics need at least 3 cells, got {n}");
    }
    let k = effective_k(n, k);
    // Sweep order: cells sorted by (label, batch), so every (label, batch) group is a contiguous
    // column range whose distance sums the sweep accumulates.
    let mut perm: Vec<usize> = (0..n).collect();
    perm.sort_by_key(|&i| (labels[i], batches[i], i));
    let mut xs = Vec::with_capacity(x.len());
    for &i in &perm {
        xs.extend_from_slice(&x[i * dim..(i + 1) * dim]);
    }
    let mut bounds = vec![0usize];
    let (mut seg_label, mut seg_of) = (Vec::new(), vec![0usize; n]);
    for p in 0..n {
        let i = perm[p];
        if p > 0 && (labels[i], batches[i]) != (labels[perm[p - 1]], batches[perm[p - 1]]) {
            bounds.push(p);
        }
        if seg_label.len() < bounds.len() {
            seg_label.push(labels[i] as usize);
        }
        seg_of[p] = bounds.len() - 1;
    }
    bounds.push(n);
    let n_seg = seg_label.len();
    let seg_size: Vec<f64> = (0..n_seg).map(|s| (bounds[s + 1] - bounds[s]) as f64).collect();
    let n_labels = n_codes(labels);
    let mut label_segs = vec![(usize::MAX, 0usize); n_labels];
    for (s, &l) in seg_label.iter().enumerate() {
        label_segs[l].0 = label_segs[l].0.min(s);
        label_segs[l].1 = s + 1;
    }
    let mut label_size = vec![0f64; n_labels];
    for &l in labels {
        label_size[l as usize] += 1.0;
    }
    let n_cand = (k + 8).min(n);
    let rows = sweep(&xs, dim, &bounds, n_cand, |p, sums, cands| {
        let (idx, dist) = knn_row(&xs, dim, p, cands, k);
        let own = seg_label[seg_of[p]];
        // Label silhouette.
        let label_sum = |l: usize| -> f64 {
            let (a, b) = label_segs[l];
            if a == usize::MAX {
                0.0
            } else {
                sums[a..b].iter().sum()
            }
        };
        let a = label_sum(own) / (label_size[own] - 1.0);
        let b =
            (0..n_labels).filter(|&l| l != own && label_size[l] > 0.0).map(|l| label_sum(l) / label_size[l]).fold(f64::INFINITY, f64::min);
        let s_label = silhouette(a, b);
        // Batch silhouette within the label.
        let (s0, s1) = label_segs[own];
        let n_b = s1 - s0;
        let batch = if n_b >= 2 && (n_b as f64) < label_size[own] {
            let me = seg_of[p];
            let a = sums[me] / (seg_size[me] - 1.0);
            let b = (s0..s1).filter(|&s| s != me).map(|s| sums[s] / seg_size[s]).fold(f64::INFINITY, f64::min);
            Some(1.0 - silhouette(a, b).abs())
        } else {
            None
        };
        (idx, dist, s_label, batch)
    });
    // Back to the input order.
    let mut label_silhouettes = vec![0f64; n];
    let mut batch_scores = vec![None; n];
    let mut indices = vec![0u32; n * k];
    let mut distances = vec![0f32; n * k];
    for (p, (idx, dist, s, b)) in rows.into_iter().enumerate() {
        let i = perm[p];
        label_silhouettes[i] = s;
        batch_scores[i] = b;
        for (m, (&j, &d)) in idx.iter().zip(&dist).enumerate() {
            indices[i * k + m] = perm[j as usize] as u32;
            distances[i * k + m] = d;
        }
    }
    Ok(DistanceMetrics { knn: Knn { k, indices, distances }, label_silhouettes, batch_scores })
}

/// scib's `silhouette_batch` from per-cell scores: mean per label, then mean over labels;
/// None when no label qualifies.
pub fn asw_batch(scores: &[Option<f64>], labels: &[u32]) -> Option<f64> {
    let k = n_codes(labels);
    let (mut sum, mut cnt) = (vec![0f64; k], vec![0usize; k]);
    for (s, &l) in scores.iter().zip(labels) {
        if let Some(v) = s {
            sum[l as usize] += v;
            cnt[l as usize] += 1;
        }
    }
    let means: Vec<f64> = (0..k).filter(|&l| cnt[l] > 0).map(|l| sum[l] / cnt[l] as f64).collect();
    (!means.is_empty()).then(|| means.iter().sum::<f64>() / means.len() as f64)
}

#[derive(Debug, Clone)]
pub struct IntegrationOptions {
    /// Leiden seed (scanpy's `random_state`, 0 by default).
    pub seed: u64,
    pub n_neighbors: usize,
    pub resolutions: Vec<f64>,
    /// Graph iLISI/cLISI (scib's `metrics` call in the scGPT tutorial leaves them off).
    pub lisi: bool,
}

impl Default for IntegrationOptions {
    fn default() -> Self {
        IntegrationOptions { seed: 0, n_neighbors: SCANPY_N_NEIGHBORS, resolutions: scib_resolutions(), lisi: true }
    }
}

/// What the metrics are computed on.
pub struct IntegrationInput<'a> {
    /// The integrated embedding, row-major cells × `dim`.
    pub embedding: &'a [f32],
    pub dim: usize,
    pub labels: &'a [String],
    pub batches: &'a [String],
    /// The unintegrated data for PCR's P_pre; None leaves PCR_batch null.
    pub pre: Option<PreIntegration<'a>>,
}

/// What scib's `pcr_comparison` regresses for P_pre.
#[derive(Debug, Clone, Copy)]
pub enum PreIntegration<'a> {
    /// A matrix to run PCA on (scib: `adata_pre.X`).
    Matrix(Features<'a>),
    /// An existing PCA (scib: `obsm["X_pca"]` with `uns["pca"]["variance"]`, used as is).
    Pca { pcs: &'a [f32], dim: usize, variance: &'a [f64] },
}

impl PreIntegration<'_> {
    fn n_rows(&self) -> usize {
        match self {
            PreIntegration::Matrix(f) => f.n_rows(),
            PreIntegration::Pca { pcs, dim, .. } => pcs.len() / (*dim).max(1),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LeidenRun {
    pub resolution: f64,
    pub n_clusters: usize,
    pub nmi: f64,
    pub modularity: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PcrDetail {
    pub p_pre: Option<f64>,
    pub p_post: f64,
    pub pre: Option<PcRegression>,
    pub post: PcRegression,
}

#[derive(Debug, Clone, Serialize)]
pub struct LisiDetail {
    pub k0: usize,
    pub perplexity: usize,
    pub median_batch: f64,
    pub median_label: f64,
    pub cells_with_fewer_than_k0_neighbours: usize,
    pub cells_with_degenerate_kernel: usize,
}

/// metrics.json: scib's key names, then the details.
#[derive(Debug, Clone, Serialize)]
pub struct IntegrationReport {
    #[serde(rename = "NMI_cluster/label")]
    pub nmi: Option<f64>,
    #[serde(rename = "ARI_cluster/label")]
    pub ari: Option<f64>,
    #[serde(rename = "ASW_label")]
    pub asw_label: Option<f64>,
    #[serde(rename = "ASW_label/batch")]
    pub asw_batch: Option<f64>,
    pub graph_conn: Option<f64>,
    #[serde(rename = "PCR_batch")]
    pub pcr_batch: Option<f64>,
    #[serde(rename = "iLISI")]
    pub ilisi: Option<f64>,
    #[serde(rename = "cLISI")]
    pub clisi: Option<f64>,
    pub avg_bio: Option<f64>,
    pub avg_batch: Option<f64>,
    pub leiden_resolution: Option<f64>,
    pub notes: Vec<String>,
    pub n_cells: usize,
    pub n_labels: usize,
    pub n_batches: usize,
    pub n_neighbors: usize,
    pub leiden: Vec<LeidenRun>,
    pub pcr: Option<PcrDetail>,
    pub lisi: Option<LisiDetail>,
    pub seconds: BTreeMap<String, f64>,
}

fn mean_of(v: &[Option<f64>]) -> Option<f64> {
    v.iter().copied().collect::<Option<Vec<f64>>>().map(|x| x.iter().sum::<f64>() / x.len() as f64)
}

/// Every metric of the report. `log` receives one line per step (progress and timing).
pub fn integration_metrics(input: &IntegrationInput, opts: &IntegrationOptions, log: &mut dyn FnMut(&str)) -> Result<IntegrationReport> {
    let n = check_points(input.embedding, input.dim, "embedding")?;
    if input.labels.len() != n || input.batches.len() != n {
        bail!("the embedding has {n} cells but there are {} labels and {} batch values", input.labels.len(), input.batches.len());
    }
    if let Some(pre) = &input.pre {
        if pre.n_rows() != n {
            bail!("the pre-integration matrix has {} cells, the embedding {n}", pre.n_rows());
        }
    }
    let (lab, lab_names) = codes(input.labels);
    let (bat, bat_names) = codes(input.batches);
    let (n_labels, n_batches) = (lab_names.len(), bat_names.len());
    let mut notes = Vec::new();
    let mut seconds = BTreeMap::new();
    let mut time = |name: &str, t: Instant, log: &mut dyn FnMut(&str)| {
        let s = t.elapsed().as_secs_f64();
        seconds.insert(name.to_string(), s);
        log(&format!("{name}: {s:.2} s"));
    };

    if n_batches < 2 {
        notes.push(format!(
            "one batch ({}): ASW_label/batch, PCR_batch, iLISI and avg_batch are undefined (null); graph_conn does not use batches and is reported",
            bat_names.first().map_or("", |s| s.as_str())
        ));
    }
    if n_labels < 2 {
        notes.push("one label: ASW_label (scikit-learn needs 2..n-1 labels), cLISI and avg_bio are undefined (null)".into());
    }
    let mut label_count = vec![0usize; n_labels];
    for &l in &lab {
        label_count[l as usize] += 1;
    }
    let singles: Vec<&str> = (0..n_labels).filter(|&l| label_count[l] == 1).map(|l| lab_names[l].as_str()).collect();
    if !singles.is_empty() {
        notes.push(format!(
            "{} label(s) with one cell ({}{}): silhouette 0 for those cells (scikit-learn), skipped by ASW_label/batch",
            singles.len(),
            singles.iter().take(10).map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
            if singles.len() > 10 { ", ..." } else { "" }
        ));
    }
    if n_batches > 2 && bat_names.iter().all(|b| b.parse::<f64>().is_ok()) {
        notes.push(
            "PCR_batch: the batch values are numbers; scib regresses on a numeric batch column as one covariate, here batches are always categories (one-hot), as for a categorical column".into(),
        );
    }
    if n >= 8192 {
        notes.push(
            "kNN is exact; scanpy uses pynndescent's approximate kNN from 8,192 cells, so graph metrics may differ slightly from scib's"
                .into(),
        );
    }

    log(&format!("{n} cells, {} dims, {n_labels} labels, {n_batches} batches", input.dim));
    let t = Instant::now();
    let dm = distance_metrics(input.embedding, input.dim, &lab, &bat, opts.n_neighbors)?;
    time("knn_and_silhouettes", t, log);
    let asw_label =
        if n_labels >= 2 && n_labels < n { Some((dm.label_silhouettes.iter().sum::<f64>() / n as f64 + 1.0) / 2.0) } else { None };
    let asw_b = if n_batches >= 2 { asw_batch(&dm.batch_scores, &lab) } else { None };
    if n_batches >= 2 {
        let mut skipped: Vec<&str> = (0..n_labels)
            .filter(|&l| label_count[l] > 1 && !dm.batch_scores.iter().zip(&lab).any(|(s, &c)| c as usize == l && s.is_some()))
            .map(|l| lab_names[l].as_str())
            .collect();
        skipped.truncate(10);
        if !skipped.is_empty() {
            notes.push(format!(
                "ASW_label/batch skips labels seen in one batch only (or one batch per cell), as scib does: {}",
                skipped.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            ));
        }
        if asw_b.is_none() {
            notes.push("ASW_label/batch: no label is seen in more than one batch, so it is undefined (null)".into());
        }
    }

    let t = Instant::now();
    let graph = umap_connectivities(&dm.knn);
    time("connectivities", t, log);

    let t = Instant::now();
    let runs: Vec<(f64, Vec<u32>)> = opts
        .resolutions
        .par_iter()
        .map(|&r| (r, leiden(&graph, &LeidenOptions { resolution: r, seed: opts.seed, n_iterations: None })))
        .collect();
    let mut leiden_runs = Vec::new();
    let (mut best, mut best_nmi) = (None::<usize>, 0.0);
    for (i, (r, m)) in runs.iter().enumerate() {
        let v = nmi(m, &lab);
        // scib keeps the first resolution whose NMI beats all before it (strictly, from 0).
        if v > best_nmi {
            best_nmi = v;
            best = Some(i);
        }
        leiden_runs.push(LeidenRun { resolution: *r, n_clusters: n_codes(m), nmi: v, modularity: modularity(&graph, m, *r) });
        log(&format!("  leiden resolution {r:.1}: {} clusters, NMI {v:.4}", n_codes(m)));
    }
    time("leiden", t, log);
    let (nmi_v, ari_v, res) = match best {
        Some(i) => (Some(best_nmi), ari(&runs[i].1, &lab), Some(runs[i].0)),
        None => {
            notes.push("no Leiden resolution gave an NMI above 0: NMI_cluster/label and ARI_cluster/label are null".into());
            (None, None, None)
        }
    };
    if best.is_some() && ari_v.is_none() {
        notes.push("ARI_cluster/label is undefined (0/0: one cluster and one label)".into());
    }

    let t = Instant::now();
    let gc = graph_connectivity(&graph, &lab);
    time("graph_conn", t, log);

    let t = Instant::now();
    let post = pc_regression(Features::Dense { data: input.embedding, dim: input.dim }, &bat, n_batches)?;
    let pre = match input.pre {
        Some(PreIntegration::Matrix(f)) => Some(pc_regression(f, &bat, n_batches)?),
        Some(PreIntegration::Pca { pcs, dim, variance }) => Some(pc_regression_precomputed(pcs, dim, variance, &bat, n_batches)?),
        None => None,
    };
    time("pcr", t, log);
    let pcr_batch = match &pre {
        _ if n_batches < 2 => None,
        None => {
            notes.push("PCR_batch: no pre-integration matrix given, so it is null".into());
            None
        }
        Some(p) if p.value <= 0.0 => {
            notes.push(
                "PCR_batch: the batch explains no variance of the pre-integration data (P_pre = 0), so it is undefined (null)".into(),
            );
            None
        }
        Some(p) => Some(((p.value - post.value) / p.value).max(0.0)),
    };
    if let Some(p) = &pre {
        if p.method == "randomized" {
            notes.push("PCR_batch: the pre-integration matrix has more than 4,096 features; its principal components come from a randomized subspace iteration (scib: ARPACK), good to ~1e-3".into());
        }
    }

    let (mut ilisi, mut clisi, mut lisi_detail) = (None, None, None);
    if opts.lisi {
        let t = Instant::now();
        let l = graph_lisi(&graph, &[(&bat, n_batches), (&lab, n_labels)], K0)?;
        time("lisi", t, log);
        let (mb, ml) = (median(&l.per_cell[0]), median(&l.per_cell[1]));
        if n_batches >= 2 {
            ilisi = Some((mb - 1.0) / (n_batches as f64 - 1.0));
        }
        if n_labels >= 2 {
            clisi = Some((n_labels as f64 - ml) / (n_labels as f64 - 1.0));
        }
        if l.n_short > 0 {
            notes.push(format!("LISI: {} cells reach fewer than {K0} other cells in the graph and score 1, as in scib", l.n_short));
        }
        if l.n_degenerate > 0 {
            notes.push(format!("LISI: {} cells have all kernel weights underflow and score -1, as in scib", l.n_degenerate));
        }
        lisi_detail = Some(LisiDetail {
            k0: K0,
            perplexity: K0 / 3,
            median_batch: mb,
            median_label: ml,
            cells_with_fewer_than_k0_neighbours: l.n_short,
            cells_with_degenerate_kernel: l.n_degenerate,
        });
    }

    let avg_bio = mean_of(&[nmi_v, ari_v, asw_label]);
    let avg_batch = mean_of(&[asw_b, Some(gc)]);
    Ok(IntegrationReport {
        nmi: nmi_v,
        ari: ari_v,
        asw_label,
        asw_batch: asw_b,
        graph_conn: Some(gc),
        pcr_batch,
        ilisi,
        clisi,
        avg_bio,
        avg_batch,
        leiden_resolution: res,
        notes,
        n_cells: n,
        n_labels,
        n_batches,
        n_neighbors: dm.knn.k,
        leiden: leiden_runs,
        pcr: Some(PcrDetail { p_pre: pre.as_ref().map(|p| p.value), p_post: post.value, pre, post }),
        lisi: lisi_detail,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmi_and_ari_limits() {
        assert_eq!(nmi(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0);
        assert_eq!(nmi(&[0, 0, 0], &[0, 0, 0]), 1.0);
        assert_eq!(nmi(&[0, 0, 0, 0], &[0, 1, 0, 1]), 0.0);
        assert!((ari(&[0, 0, 1, 1], &[1, 1, 0, 0]).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(ari(&[0, 0, 0], &[0, 0, 0]), None);
    }

    #[test]
    fn resolutions_are_scibs() {
        let r = scib_resolutions();
        assert_eq!(r.len(), 10);
        assert_eq!(r[0], 0.2);
        assert_eq!(r[2], 0.6);
        assert_eq!(r[9], 2.0);
    }

    #[test]
    fn codes_are_sorted_categories() {
        let (c, names) = codes(&["b", "a", "b", "c"]);
        assert_eq!(c, vec![1, 0, 1, 2]);
        assert_eq!(names, vec!["a", "b", "c"]);
    }

    #[test]
    fn graph_connectivity_counts_components_per_label() {
        // Label 0: nodes 0-1-2 connected, 3 alone; label 1: nodes 4-5.
        let mut rows = vec![Vec::new(); 6];
        for (a, b) in [(0usize, 1usize), (1, 2), (2, 4), (4, 5), (3, 5)] {
            rows[a].push((b as u32, 1.0));
            rows[b].push((a as u32, 1.0));
        }
        let g = Graph::from_rows(rows);
        let v = graph_connectivity(&g, &[0, 0, 0, 0, 1, 1]);
        assert!((v - (0.75 + 1.0) / 2.0).abs() < 1e-12);
    }
}
