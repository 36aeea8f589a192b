//! A 2-D UMAP layout of an embedding for looking at (McInnes, Healy & Melville 2018), as
//! umap-learn 0.5 lays out the graph scanpy's `sc.tl.umap` hands it, and the two-panel picture
//! (cells coloured by label and by batch).
//!
//! The graph is the one every scIB graph metric here uses ([`crate::neighbors`]: exact
//! euclidean kNN and umap's fuzzy simplicial set). The layout follows umap-learn's
//! `simplicial_set_embedding` with `optimize_layout_euclidean`: edges weaker than max/n_epochs
//! dropped, each edge sampled in proportion to its weight, attraction
//! −2ab·d^(2(b−1))/(1 + a·d^(2b)), `negative_sample_rate` repulsive samples per attraction with
//! 2γb/((0.001 + d²)(1 + a·d^(2b))), gradients clipped to ±4, learning rate falling linearly to
//! 0, 500 epochs up to 10,000 cells and 200 above. a and b come from umap's curve fit for
//! scanpy's defaults (min_dist 0.5, spread 1).
//!
//! Differences from scanpy, by design (the picture is for eyes, not numbers):
//! - Initial layout: the input's first two principal components (umap-learn's `init="pca"`),
//!   not scanpy's spectral layout, which needs a sparse eigensolver.
//! - One thread and a ChaCha8 stream for the negative samples: the same seed gives the same
//!   picture (umap-learn's parallel epochs do not).
//!
//! Why not the `umap-rs` crate: it takes a precomputed kNN and an initial layout (the parts that
//! need choosing anyway), panics on invalid input, and its parallel SGD is not reproducible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::heatmap::{register_font, text_width, FONT};
use crate::neighbors::{check_points, exact_knn, umap_connectivities, Graph, SCANPY_N_NEIGHBORS};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UmapOptions {
    /// Neighbours per cell, the cell included (scanpy's `n_neighbors`).
    pub n_neighbors: usize,
    /// scanpy's `sc.tl.umap` defaults: min_dist 0.5, spread 1.
    pub min_dist: f64,
    pub spread: f64,
    /// None: 500 up to 10,000 cells, 200 above (umap-learn's default).
    pub n_epochs: Option<usize>,
    pub learning_rate: f64,
    pub negative_sample_rate: usize,
    pub repulsion_strength: f64,
    pub seed: u64,
}

impl Default for UmapOptions {
    fn default() -> Self {
        UmapOptions {
            n_neighbors: SCANPY_N_NEIGHBORS,
            min_dist: 0.5,
            spread: 1.0,
            n_epochs: None,
            learning_rate: 1.0,
            negative_sample_rate: 5,
            repulsion_strength: 1.0,
            seed: 0,
        }
    }
}

/// umap-learn's `find_ab_params(spread, min_dist)`: the least-squares fit of
/// 1 / (1 + a·x^(2b)) to 1 below `min_dist` and exp(−(x − min_dist)/spread) above, on 300
/// points of [0, 3·spread] (scipy's `curve_fit`, Levenberg–Marquardt from (1, 1)).
pub fn find_ab_params(spread: f64, min_dist: f64) -> Result<(f64, f64)> {
    if !(spread.is_finite() && spread > 0.0 && min_dist.is_finite() && min_dist >= 0.0) {
        bail!("UMAP: spread must be positive and min_dist non-negative (got spread {spread}, min_dist {min_dist})");
    }
    let m = 300;
    let xs: Vec<f64> = (0..m).map(|i| spread * 3.0 * i as f64 / (m - 1) as f64).collect();
    let ys: Vec<f64> = xs.iter().map(|&x| if x < min_dist { 1.0 } else { (-(x - min_dist) / spread).exp() }).collect();
    // Residuals and the Jacobian (d/da, d/db) at (a, b); x^(2b)·ln x → 0 at x = 0.
    let eval = |a: f64, b: f64| -> (f64, [f64; 3], [f64; 2]) {
        let (mut cost, mut jtj, mut jtr) = (0.0, [0.0; 3], [0.0; 2]);
        for (&x, &y) in xs.iter().zip(&ys) {
            let u = if x > 0.0 { x.powf(2.0 * b) } else { 0.0 };
            let f = 1.0 / (1.0 + a * u);
            let r = f - y;
            let g = -f * f;
            let ja = g * u;
            let jb = if x > 0.0 { g * a * u * 2.0 * x.ln() } else { 0.0 };
            cost += r * r;
            jtj[0] += ja * ja;
            jtj[1] += ja * jb;
            jtj[2] += jb * jb;
            jtr[0] += ja * r;
            jtr[1] += jb * r;
        }
        (cost, jtj, jtr)
    };
    let (mut a, mut b, mut lambda) = (1.0f64, 1.0f64, 1e-3);
    let (mut cost, mut jtj, mut jtr) = eval(a, b);
    for _ in 0..500 {
        // Marquardt's scaling: damp each parameter by its own curvature.
        let (h00, h11) = (jtj[0] * (1.0 + lambda), jtj[2] * (1.0 + lambda));
        let det = h00 * h11 - jtj[1] * jtj[1];
        if !(det.is_finite() && det != 0.0) {
            lambda *= 10.0;
            continue;
        }
        let da = -(h11 * jtr[0] - jtj[1] * jtr[1]) / det;
        let db = -(h00 * jtr[1] - jtj[1] * jtr[0]) / det;
        let (na, nb) = (a + da, b + db);
        if na > 0.0 && nb > 0.0 {
            let (c2, j2, r2) = eval(na, nb);
            if c2 <= cost {
                let done = (cost - c2) <= 1e-15 * cost.max(1e-300) && da.abs() <= 1e-12 * a && db.abs() <= 1e-12 * b;
                (a, b, cost, jtj, jtr) = (na, nb, c2, j2, r2);
                lambda = (lambda / 10.0).max(1e-12);
                if done {
                    break;
                }
                continue;
            }
        }
        lambda *= 10.0;
        if lambda > 1e12 {
            break;
        }
    }
    Ok((a, b))
}

/// First two principal components of the rows of `x`, scaled as umap-learn scales an initial
/// layout: largest |coordinate| 10, N(0, 1e-4) noise, then each axis mapped onto [0, 10].
fn pca_init(x: &[f32], n: usize, dim: usize, rng: &mut ChaCha8Rng) -> Result<Vec<f64>> {
    let mut mean = vec![0f64; dim];
    for i in 0..n {
        for a in 0..dim {
            mean[a] += x[i * dim + a] as f64 / n as f64;
        }
    }
    let mut cov = faer::Mat::<f64>::zeros(dim, dim);
    for i in 0..n {
        let row = &x[i * dim..(i + 1) * dim];
        for a in 0..dim {
            let va = row[a] as f64 - mean[a];
            for c in 0..=a {
                cov[(a, c)] += va * (row[c] as f64 - mean[c]);
            }
        }
    }
    let evd = cov.self_adjoint_eigen(faer::Side::Lower).map_err(|e| anyhow!("UMAP initial layout: eigendecomposition failed: {e:?}"))?;
    let u = evd.U();
    let mut init = vec![0f64; n * 2];
    for c in 0..2.min(dim) {
        // faer sorts eigenvalues increasingly: the top components are the last columns.
        let col = dim - 1 - c;
        for i in 0..n {
            init[i * 2 + c] = (0..dim).map(|a| (x[i * dim + a] as f64 - mean[a]) * u[(a, col)]).sum();
        }
    }
    let max = init.iter().fold(0f64, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { 10.0 / max } else { 0.0 };
    let noise = Normal::new(0.0, 1e-4).expect("valid normal");
    for v in init.iter_mut() {
        *v = *v * scale + noise.sample(rng);
    }
    for c in 0..2 {
        let (lo, hi) = (0..n).map(|i| init[i * 2 + c]).fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
        let range = if hi > lo { hi - lo } else { 1.0 };
        for i in 0..n {
            init[i * 2 + c] = 10.0 * (init[i * 2 + c] - lo) / range;
        }
    }
    Ok(init)
}

/// A 2-D UMAP layout of the rows of `x` (`dim` values each): row-major cells × 2.
pub fn umap(x: &[f32], dim: usize, opts: &UmapOptions) -> Result<Vec<f32>> {
    let n = check_points(x, dim, "UMAP input")?;
    if n < 3 {
        bail!("UMAP needs at least 3 cells, got {n}");
    }
    if opts.n_neighbors < 2 {
        bail!("UMAP: n_neighbors must be at least 2, got {}", opts.n_neighbors);
    }
    let knn = exact_knn(x, dim, opts.n_neighbors)?;
    let graph = umap_connectivities(&knn);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let init = pca_init(x, n, dim, &mut rng)?;
    layout(&graph, init, opts, &mut rng)
}

/// umap-learn's SGD layout of `graph` from `init` (row-major n × 2).
fn layout(graph: &Graph, emb: Vec<f64>, opts: &UmapOptions, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
    let n = graph.n();
    let (a, b) = find_ab_params(opts.spread, opts.min_dist)?;
    let n_epochs = opts.n_epochs.unwrap_or(if n <= 10_000 { 500 } else { 200 });
    let w_max = graph.weights.iter().copied().fold(0f32, f32::max) as f64;
    // Edges (both directions, as scipy's COO of the symmetric graph), weak ones dropped.
    let mut edges: Vec<(u32, u32, f64)> = Vec::with_capacity(graph.weights.len());
    for i in 0..n {
        let (idx, w) = graph.row(i);
        for (&j, &wij) in idx.iter().zip(w) {
            if n_epochs > 0 && (wij as f64) >= w_max / n_epochs as f64 {
                edges.push((i as u32, j, wij as f64));
            }
        }
    }
    // Epochs between samples: an edge of the largest weight every epoch.
    let eps: Vec<f64> = edges.iter().map(|e| w_max / e.2).collect();
    let neg_rate = opts.negative_sample_rate.max(1) as f64;
    let eps_neg: Vec<f64> = eps.iter().map(|e| e / neg_rate).collect();
    let mut next = eps.clone();
    let mut next_neg = eps_neg.clone();
    // The layout itself in f32, as umap-learn keeps it: the picture needs no more, and f32
    // powers are about twice as fast as f64 ones (they are most of the cost).
    let mut y: Vec<f32> = emb.iter().map(|&v| v as f32).collect();
    drop(emb);
    let (a, b, gamma) = (a as f32, b as f32, opts.repulsion_strength as f32);
    let clip = |v: f32| v.clamp(-4.0, 4.0);
    let mut alpha = opts.learning_rate as f32;
    for epoch in 0..n_epochs {
        let e = epoch as f64;
        for (s, &(j, k, _)) in edges.iter().enumerate() {
            if next[s] > e {
                continue;
            }
            let (j, k) = (j as usize, k as usize);
            let (dx, dy) = (y[2 * j] - y[2 * k], y[2 * j + 1] - y[2 * k + 1]);
            let d2 = dx * dx + dy * dy;
            if d2 > 0.0 {
                // d^(2(b−1)) = d^(2b) / d²: one power per sample instead of two.
                let pb = d2.powf(b);
                let g = -2.0 * a * b * (pb / d2) / (a * pb + 1.0);
                let (gx, gy) = (clip(g * dx) * alpha, clip(g * dy) * alpha);
                y[2 * j] += gx;
                y[2 * j + 1] += gy;
                y[2 * k] -= gx;
                y[2 * k + 1] -= gy;
            }
            next[s] += eps[s];
            let n_neg = ((e - next_neg[s]) / eps_neg[s]).max(0.0) as usize;
            for _ in 0..n_neg {
                let other = rng.random_range(0..n);
                let (dx, dy) = (y[2 * j] - y[2 * other], y[2 * j + 1] - y[2 * other + 1]);
                let d2 = dx * dx + dy * dy;
                if d2 > 0.0 {
                    let g = 2.0 * gamma * b / ((0.001 + d2) * (a * d2.powf(b) + 1.0));
                    y[2 * j] += clip(g * dx) * alpha;
                    y[2 * j + 1] += clip(g * dy) * alpha;
                }
            }
            next_neg[s] += n_neg as f64 * eps_neg[s];
        }
        alpha = (opts.learning_rate * (1.0 - (epoch + 1) as f64 / n_epochs as f64)) as f32;
    }
    if y.iter().any(|v| !v.is_finite()) {
        bail!("UMAP: the layout diverged (non-finite coordinates)");
    }
    Ok(y)
}

/// One panel of the picture: a title and one category per cell.
pub struct Colouring<'a> {
    pub title: &'a str,
    pub values: &'a [String],
}

/// matplotlib's tab10 and tab20, which scanpy uses for up to 10 and 20 categories.
const TAB10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];
const TAB20: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (174, 199, 232),
    (255, 127, 14),
    (255, 187, 120),
    (44, 160, 44),
    (152, 223, 138),
    (214, 39, 40),
    (255, 152, 150),
    (148, 103, 189),
    (197, 176, 213),
    (140, 86, 75),
    (196, 156, 148),
    (227, 119, 194),
    (247, 182, 210),
    (127, 127, 127),
    (199, 199, 199),
    (188, 189, 34),
    (219, 219, 141),
    (23, 190, 207),
    (158, 218, 229),
];

fn palette(k: usize) -> Vec<RGBColor> {
    if k <= 10 {
        return TAB10[..k].iter().map(|&(r, g, b)| RGBColor(r, g, b)).collect();
    }
    if k <= 20 {
        return TAB20[..k].iter().map(|&(r, g, b)| RGBColor(r, g, b)).collect();
    }
    // More categories: hues a golden angle apart, alternating two lightness levels.
    (0..k)
        .map(|i| {
            let h = (i as f64 * 0.618_033_988_749_895).fract();
            let l = if i % 2 == 0 { 0.45 } else { 0.65 };
            let c = (1.0 - (2.0f64 * l - 1.0).abs()) * 0.75;
            let hp = h * 6.0;
            let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
            let (r, g, b) = match hp as u32 {
                0 => (c, x, 0.0),
                1 => (x, c, 0.0),
                2 => (0.0, c, x),
                3 => (0.0, x, c),
                4 => (x, 0.0, c),
                _ => (c, 0.0, x),
            };
            let m = l - c / 2.0;
            let to = |v: f64| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
            RGBColor(to(r), to(g), to(b))
        })
        .collect()
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the UMAP picture: {e}")
}

/// A category name for the legend: "(missing)" for the empty value, long names cut.
fn legend_name(s: &str) -> String {
    if s.is_empty() {
        return "(missing)".into();
    }
    let chars: Vec<char> = s.chars().collect();
    if chars.len() > 36 {
        format!("{}…", chars[..35].iter().collect::<String>())
    } else {
        s.to_string()
    }
}

/// Writes `dir/name` (PNG): the layout `coords` (row-major cells × 2) once per panel, each
/// cell coloured by its category in that panel, with a legend beside each panel. Cells are
/// drawn in a fixed shuffled order so that no category hides the others.
pub fn write_umap_png(dir: &Path, name: &str, coords: &[f32], title: &str, panels: &[Colouring]) -> Result<PathBuf> {
    let n = coords.len() / 2;
    if coords.len() != 2 * n || coords.iter().any(|v| !v.is_finite()) {
        bail!("UMAP picture: the coordinates must be finite pairs ({} values given)", coords.len());
    }
    if panels.is_empty() {
        bail!("UMAP picture: no panel to draw");
    }
    for p in panels {
        if p.values.len() != n {
            bail!("UMAP picture: panel `{}` has {} values for {n} cells", p.title, p.values.len());
        }
    }
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
    let tmp = atomic::temp_path(dir, name);
    if let Err(e) = draw(&tmp, coords, title, panels) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    atomic::commit(&tmp, dir, name)
}

fn draw(path: &Path, coords: &[f32], title: &str, panels: &[Colouring]) -> Result<()> {
    let n = coords.len() / 2;
    const PLOT: i32 = 560;
    const PAD: i32 = 16;
    const TITLE_H: i32 = 44;
    const LINE: i32 = 17;
    const LEGEND_SIZE: f64 = 13.0;
    let max_rows = ((PLOT - 24) / LINE) as usize;
    // Per panel: sorted categories, cell codes, colours, legend layout.
    struct Panel<'a> {
        title: &'a str,
        names: Vec<String>,
        codes: Vec<usize>,
        colours: Vec<RGBColor>,
        shown: usize,
        columns: usize,
        col_w: i32,
    }
    let built: Vec<Panel> = panels
        .iter()
        .map(|p| {
            let cats: BTreeMap<&str, usize> = p.values.iter().map(|v| (v.as_str(), 0)).collect();
            let names: Vec<String> = cats.keys().map(|s| s.to_string()).collect();
            let index: BTreeMap<&str, usize> = cats.keys().enumerate().map(|(i, s)| (*s, i)).collect();
            let codes = p.values.iter().map(|v| index[v.as_str()]).collect();
            let colours = palette(names.len());
            // Up to three legend columns; beyond that the rest is summarised in one line.
            let columns = names.len().div_ceil(max_rows).clamp(1, 3);
            let shown = names.len().min(columns * max_rows - usize::from(names.len() > columns * max_rows));
            let col_w = names[..shown].iter().map(|s| text_width(&legend_name(s), LEGEND_SIZE) as i32).max().unwrap_or(0).min(260) + 28;
            Panel { title: p.title, names, codes, colours, shown, columns, col_w }
        })
        .collect();
    let widths: Vec<i32> = built.iter().map(|p| PLOT + 12 + p.columns as i32 * p.col_w + PAD).collect();
    // LEFT leaves room for the rotated UMAP2 axis name left of the first panel.
    const LEFT: i32 = PAD + 14;
    let width = (LEFT + widths.iter().sum::<i32>()).max(text_width(title, 18.0) as i32 + 2 * PAD);
    let height = TITLE_H + 28 + PLOT + 28 + PAD;
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let title_style = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw_text(title, &title_style, (width / 2, PAD)).map_err(draw_err)?;

    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY, f32::NEG_INFINITY);
    for i in 0..n {
        xlo = xlo.min(coords[2 * i]);
        xhi = xhi.max(coords[2 * i]);
        ylo = ylo.min(coords[2 * i + 1]);
        yhi = yhi.max(coords[2 * i + 1]);
    }
    let (xr, yr) = ((xhi - xlo).max(1e-6), (yhi - ylo).max(1e-6));
    let inner = PLOT - 20;
    let radius = if n <= 2_000 {
        3
    } else if n <= 20_000 {
        2
    } else {
        1
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(0));
    let panel_title = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let axis = TextStyle::from((FONT, 12).into_font()).color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Center, VPos::Top));
    let axis_v = axis.transform(FontTransform::Rotate270).pos(Pos::new(HPos::Center, VPos::Bottom));
    let legend_style = TextStyle::from((FONT, LEGEND_SIZE).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let mut x0 = LEFT;
    for (p, w) in built.iter().zip(&widths) {
        let top = TITLE_H + 28;
        root.draw_text(p.title, &panel_title, (x0 + PLOT / 2, top - 6)).map_err(draw_err)?;
        root.draw(&Rectangle::new([(x0, top), (x0 + PLOT, top + PLOT)], RGBColor(160, 160, 160).stroke_width(1))).map_err(draw_err)?;
        root.draw_text("UMAP1", &axis, (x0 + PLOT / 2, top + PLOT + 4)).map_err(draw_err)?;
        root.draw_text("UMAP2", &axis_v, (x0 - 4, top + PLOT / 2)).map_err(draw_err)?;
        for &i in &order {
            let px = x0 + 10 + ((coords[2 * i] - xlo) / xr * inner as f32).round() as i32;
            // Screen y grows downwards.
            let py = top + 10 + ((yhi - coords[2 * i + 1]) / yr * inner as f32).round() as i32;
            root.draw(&Circle::new((px, py), radius, p.colours[p.codes[i]].filled())).map_err(draw_err)?;
        }
        let lx = x0 + PLOT + 12;
        for (c, name) in p.names[..p.shown].iter().enumerate() {
            let (col, row) = (c / max_rows, c % max_rows);
            let (ex, ey) = (lx + col as i32 * p.col_w, top + 12 + row as i32 * LINE);
            root.draw(&Circle::new((ex + 6, ey), 5, p.colours[c].filled())).map_err(draw_err)?;
            root.draw_text(&legend_name(name), &legend_style, (ex + 16, ey)).map_err(draw_err)?;
        }
        if p.shown < p.names.len() {
            let c = p.shown;
            let (col, row) = (c / max_rows, c % max_rows);
            let more = format!("… and {} more", p.names.len() - p.shown);
            root.draw_text(&more, &legend_style, (lx + col as i32 * p.col_w + 16, top + 12 + row as i32 * LINE)).map_err(draw_err)?;
        }
        x0 += w;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `k` Gaussian clusters of `per` cells in `dim` dimensions, centres 10 apart.
    fn clusters(k: usize, per: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0f32, 1.0).unwrap();
        let (mut x, mut lab) = (Vec::new(), Vec::new());
        for c in 0..k {
            for _ in 0..per {
                for a in 0..dim {
                    x.push(if a == c % dim { 10.0 * (1 + c / dim) as f32 } else { 0.0 } + noise.sample(&mut rng));
                }
                lab.push(c as u32);
            }
        }
        (x, lab)
    }

    /// Share of each cell's 10 nearest cells in the layout that carry its label.
    fn purity(y: &[f32], lab: &[u32]) -> f64 {
        let knn = exact_knn(y, 2, 11).unwrap();
        let n = lab.len();
        (0..n).map(|i| knn.row(i).0[1..].iter().filter(|&&j| lab[j as usize] == lab[i]).count() as f64 / 10.0).sum::<f64>() / n as f64
    }

    #[test]
    fn keeps_separated_clusters_apart_and_is_seeded() {
        let (x, lab) = clusters(5, 80, 10, 1);
        let opts = UmapOptions { n_epochs: Some(200), ..Default::default() };
        let y = umap(&x, 10, &opts).unwrap();
        assert_eq!(y.len(), 2 * lab.len());
        let p = purity(&y, &lab);
        println!("2-D kNN label purity {p:.4}");
        assert!(p > 0.95, "{p}");
        assert_eq!(umap(&x, 10, &opts).unwrap(), y);
        assert_ne!(umap(&x, 10, &UmapOptions { seed: 1, ..opts }).unwrap(), y);
    }

    #[test]
    fn many_categories_fold_the_legend() {
        // 120 categories: three legend columns, then "… and N more"; long and empty names.
        let n = 240;
        let coords: Vec<f32> = (0..2 * n).map(|i| (i * 37 % 101) as f32).collect();
        let mut many: Vec<String> = (0..n).map(|i| format!("category number {} with a rather long name indeed", i % 120)).collect();
        many[0].clear();
        let few: Vec<String> = (0..n).map(|i| format!("b{}", i % 2)).collect();
        let dir = tempfile::tempdir().unwrap();
        let panels = [Colouring { title: "many", values: &many }, Colouring { title: "few", values: &few }];
        let p = write_umap_png(dir.path(), "m.png", &coords, "many categories", &panels).unwrap();
        assert!(std::fs::metadata(p).unwrap().len() > 1000);
        assert_eq!(palette(120).len(), 120);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(umap(&[0.0, 1.0, 2.0, 3.0], 2, &UmapOptions::default()).is_err());
        assert!(umap(&[0.0, f32::NAN, 2.0, 3.0, 4.0, 5.0], 2, &UmapOptions::default()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let vals = vec!["a".to_string(); 2];
        assert!(write_umap_png(dir.path(), "u.png", &[0.0, 1.0, f32::NAN, 2.0], "t", &[Colouring { title: "x", values: &vals }]).is_err());
        assert!(write_umap_png(dir.path(), "u.png", &[0.0, 1.0, 1.0, 2.0], "t", &[Colouring { title: "x", values: &vals[..1] }]).is_err());
    }
}
