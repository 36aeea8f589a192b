//! The GEARS perturbation picture (`gears.utils.plot_perturbation`, the same function in scGPT's
//! Tutorial_Perturbation): for one condition, its top DE genes along the x axis (gene symbols,
//! labels turned a quarter), and on the y axis the change in expression over the control mean —
//! a box plot of the true perturbed cells (matplotlib's `plt.boxplot(truth, showfliers=False,
//! medianprops=dict(linewidth=0))`: box from the first to the third quartile, whiskers to the
//! most extreme cells within 1.5 IQR, no fliers, no median line), the predicted mean as a red
//! dot per gene, a green dashed line at 0, the condition as title, no top or right spine
//! (`sns.despine()`).
//!
//! Beyond GEARS: an optional second marker series (a baseline, say), drawn as blue triangles
//! with a legend under the gene names; GEARS' y label "Change in Gene Expression over Control"
//! is shortened to "Change over control".
//!
//! Text is the bundled DejaVu Sans (`heatmap.rs`); the file is written under a temporary
//! name and renamed into place.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use crate::atomic;
use crate::heatmap::{register_font, text_width, FONT};

/// One condition's picture. `genes`, `truth`, `predicted` and `extra`'s values run in the same
/// (rank) order.
#[derive(Debug, Clone, Copy)]
pub struct DePlot<'a> {
    /// The title, e.g. `"FOSB+ctrl"`.
    pub condition: &'a str,
    /// The DE genes in rank order: the x axis.
    pub genes: &'a [String],
    /// Per gene: the true perturbed cells' values minus the control mean (a gene without values
    /// gets no box).
    pub truth: &'a [Vec<f32>],
    /// Per gene: the predicted mean minus the control mean (red dots).
    pub predicted: &'a [f64],
    /// An optional second series, its legend name and per-gene values (blue triangles).
    pub extra: Option<(&'a str, &'a [f64])>,
}

/// The numbers a matplotlib box is drawn from (`matplotlib.cbook.boxplot_stats`, `whis=1.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxStats {
    /// First quartile, `np.percentile(x, 25)` (linear interpolation).
    pub q1: f64,
    pub median: f64,
    /// Third quartile, `np.percentile(x, 75)`.
    pub q3: f64,
    /// The smallest value ≥ q1 − 1.5·IQR (q1 if that is above q1).
    pub whisker_low: f64,
    /// The largest value ≤ q3 + 1.5·IQR (q3 if that is below q3).
    pub whisker_high: f64,
}

/// numpy's `percentile(x, 100 q)` with the default "linear" method on sorted `x`, including
/// numpy's `_lerp` (which interpolates from the upper neighbour when the fraction is ≥ 0.5), so
/// that the result agrees with numpy bit for bit.
fn percentile_sorted(x: &[f64], q: f64) -> f64 {
    let h = (x.len() - 1) as f64 * q;
    let lo = h.floor();
    let i = lo as usize;
    let t = h - lo;
    if i + 1 >= x.len() {
        return x[x.len() - 1];
    }
    let (a, b) = (x[i], x[i + 1]);
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// The box of `values` as matplotlib draws it; `None` when `values` is empty or holds a
/// non-finite value.
pub fn box_stats(values: &[f32]) -> Option<BoxStats> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut x: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    x.sort_by(|a, b| a.total_cmp(b));
    let (q1, median, q3) = (percentile_sorted(&x, 0.25), percentile_sorted(&x, 0.5), percentile_sorted(&x, 0.75));
    let iqr = q3 - q1;
    let (lo_fence, hi_fence) = (q1 - 1.5 * iqr, q3 + 1.5 * iqr);
    let whisker_high = match x.iter().rev().find(|&&v| v <= hi_fence) {
        Some(&v) if v >= q3 => v,
        _ => q3,
    };
    let whisker_low = match x.iter().find(|&&v| v >= lo_fence) {
        Some(&v) if v <= q1 => v,
        _ => q1,
    };
    Some(BoxStats { q1, median, q3, whisker_low, whisker_high })
}

const PAD: i32 = 16;
const TITLE_H: i32 = 40;
/// Room left of the plot for the y axis name, tick labels and ticks.
const LEFT: i32 = 100;
const RIGHT: i32 = 24;
const SLOT: i32 = 56;
const MIN_PLOT_W: i32 = 280;
const PLOT_H: i32 = 340;
/// Room under the plot for the tick marks and the turned gene names (longer names are cut).
const GENE_H: i32 = 118;
const LEGEND_H: i32 = 28;
const TITLE_SIZE: f64 = 18.0;
const GENE_SIZE: f64 = 13.0;
const LEGEND_SIZE: f64 = 13.0;

/// matplotlib's "red", "green" and tab10's blue.
pub const PREDICTED_COLOUR: RGBColor = RGBColor(255, 0, 0);
pub const EXTRA_COLOUR: RGBColor = RGBColor(31, 119, 180);
const ZERO_COLOUR: RGBColor = RGBColor(0, 128, 0);

/// The size in pixels of the picture [`write_de_plot`] draws for `plot`: 56 pixels per gene
/// (the plot at least 280 wide) plus 124 for the axis, 530 high, 28 more with a legend; wider
/// if the title needs it.
pub fn de_plot_size(plot: &DePlot) -> (u32, u32) {
    let plot_w = (plot.genes.len() as i32 * SLOT).max(MIN_PLOT_W);
    let width = (LEFT + plot_w + RIGHT).max(text_width(plot.condition, TITLE_SIZE) as i32 + 2 * PAD);
    let height = PAD + TITLE_H + PLOT_H + GENE_H + if plot.extra.is_some() { LEGEND_H } else { 0 } + PAD;
    (width as u32, height as u32)
}

fn check(plot: &DePlot) -> Result<()> {
    let n = plot.genes.len();
    if n == 0 {
        bail!("perturbation plot for `{}`: no genes to draw", plot.condition);
    }
    if plot.truth.len() != n {
        bail!("perturbation plot for `{}`: {} genes but {} truth columns", plot.condition, n, plot.truth.len());
    }
    if plot.predicted.len() != n {
        bail!("perturbation plot for `{}`: {} genes but {} predicted values", plot.condition, n, plot.predicted.len());
    }
    if let Some((name, values)) = plot.extra {
        if values.len() != n {
            bail!("perturbation plot for `{}`: {} genes but {} `{name}` values", plot.condition, n, values.len());
        }
    }
    for (g, gene) in plot.genes.iter().enumerate() {
        if let Some(v) = plot.truth[g].iter().find(|v| !v.is_finite()) {
            bail!("perturbation plot for `{}`: gene `{gene}` has a non-finite true value ({v})", plot.condition);
        }
        if !plot.predicted[g].is_finite() {
            bail!("perturbation plot for `{}`: gene `{gene}` has a non-finite predicted value ({})", plot.condition, plot.predicted[g]);
        }
        if let Some((name, values)) = plot.extra {
            if !values[g].is_finite() {
                bail!("perturbation plot for `{}`: gene `{gene}` has a non-finite `{name}` value ({})", plot.condition, values[g]);
            }
        }
    }
    Ok(())
}

/// Writes `path` (PNG) for one condition; see the module documentation. Mismatched lengths, no
/// genes or a non-finite value (the gene is named) are errors, and nothing is written then.
pub fn write_de_plot(plot: &DePlot, path: &Path) -> Result<()> {
    check(plot)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("perturbation plot: `{}` has no usable file name", path.display()))?;
    if !name.to_ascii_lowercase().ends_with(".png") {
        bail!("perturbation plot: `{}` must end in .png", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
    let tmp = atomic::temp_path(dir, name);
    if let Err(e) = draw(&tmp, plot) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    atomic::commit(&tmp, dir, name)?;
    Ok(())
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the perturbation plot: {e}")
}

/// Tick positions a little like matplotlib's: a step of 1, 2, 2.5 or 5 times a power of ten
/// giving at most about 7 ticks over `[lo, hi]`, and the decimals its labels need.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let mult = [1.0, 2.0, 2.5, 5.0, 10.0].into_iter().find(|&m| m * mag >= raw * (1.0 - 1e-9)).unwrap_or(10.0);
    let step = mult * mag;
    let decimals = (-(step.log10().floor()) as i32 + i32::from(mult == 2.5)).max(0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), decimals)
}

/// `text` cut (with "…") to at most `max_w` pixels at `size`.
fn fit(text: &str, size: f64, max_w: u32) -> String {
    if text_width(text, size) <= max_w {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for k in (1..chars.len()).rev() {
        let cut = format!("{}…", chars[..k].iter().collect::<String>());
        if text_width(&cut, size) <= max_w {
            return cut;
        }
    }
    "…".to_string()
}

fn draw(path: &Path, plot: &DePlot) -> Result<()> {
    let (width, height) = de_plot_size(plot);
    let n = plot.genes.len();
    let stats: Vec<Option<BoxStats>> = plot.truth.iter().map(|t| box_stats(t)).collect();

    // The y range: whiskers, markers and the zero line, with matplotlib's 5% margins.
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    let mut take = |v: f64| {
        lo = lo.min(v);
        hi = hi.max(v);
    };
    for s in stats.iter().flatten() {
        take(s.whisker_low);
        take(s.whisker_high);
    }
    plot.predicted.iter().for_each(|&v| take(v));
    if let Some((_, values)) = plot.extra {
        values.iter().for_each(|&v| take(v));
    }
    if hi - lo <= 1e-12 * hi.abs().max(lo.abs()).max(1.0) {
        lo -= 1.0;
        hi += 1.0;
    }
    let margin = 0.05 * (hi - lo);
    let (lo, hi) = (lo - margin, hi + margin);

    let plot_w = (n as i32 * SLOT).max(MIN_PLOT_W);
    let slot = plot_w as f64 / n as f64;
    let (x0, y0) = (LEFT, PAD + TITLE_H);
    let (x1, y1) = (x0 + plot_w, y0 + PLOT_H);
    let xc = |g: usize| x0 as f64 + (g as f64 + 0.5) * slot;
    let yp = |v: f64| y0 as f64 + (hi - v) / (hi - lo) * PLOT_H as f64;
    let px = |x: f64, y: f64| (x.round() as i32, y.round() as i32);

    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let title_style = TextStyle::from((FONT, TITLE_SIZE).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    let title_x =
        if text_width(plot.condition, TITLE_SIZE) as i32 + 2 * PAD > LEFT + plot_w + RIGHT { width as i32 / 2 } else { (x0 + x1) / 2 };
    root.draw_text(plot.condition, &title_style, (title_x, PAD + 8)).map_err(draw_err)?;

    // Axes: left and bottom spines only.
    let axis_line = BLACK.stroke_width(1);
    root.draw(&PathElement::new(vec![(x0, y0), (x0, y1)], axis_line)).map_err(draw_err)?;
    root.draw(&PathElement::new(vec![(x0, y1), (x1, y1)], axis_line)).map_err(draw_err)?;
    let (tick_vals, decimals) = ticks(lo, hi);
    let tick_style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for t in tick_vals {
        let y = yp(t).round() as i32;
        root.draw(&PathElement::new(vec![(x0 - 4, y), (x0, y)], axis_line)).map_err(draw_err)?;
        let mut label = format!("{t:.decimals$}");
        if label.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
            label = label.trim_start_matches('-').to_string();
        }
        root.draw_text(&label, &tick_style, (x0 - 7, y)).map_err(draw_err)?;
    }
    let ylabel = TextStyle::from((FONT, 14).into_font()).transform(FontTransform::Rotate270).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw_text("Change over control", &ylabel, (PAD, (y0 + y1) / 2)).map_err(draw_err)?;

    // The zero line (dashed, behind the data).
    let yz = yp(0.0).round() as i32;
    let mut x = x0;
    while x < x1 {
        let end = (x + 6).min(x1);
        root.draw(&PathElement::new(vec![(x, yz), (end, yz)], ZERO_COLOUR.stroke_width(1))).map_err(draw_err)?;
        x += 10;
    }

    // Boxes: half a slot wide, caps half the box.
    let box_line = BLACK.stroke_width(1);
    for (g, s) in stats.iter().enumerate() {
        let Some(s) = s else { continue };
        let c = xc(g);
        let (bl, br) = (c - 0.25 * slot, c + 0.25 * slot);
        let (cl, cr) = (c - 0.125 * slot, c + 0.125 * slot);
        let (yq1, yq3) = (yp(s.q1), yp(s.q3));
        root.draw(&Rectangle::new([px(bl, yq3), px(br, yq1)], box_line)).map_err(draw_err)?;
        for (from, to) in [(yq3, yp(s.whisker_high)), (yq1, yp(s.whisker_low))] {
            root.draw(&PathElement::new(vec![px(c, from), px(c, to)], box_line)).map_err(draw_err)?;
            root.draw(&PathElement::new(vec![px(cl, to), px(cr, to)], box_line)).map_err(draw_err)?;
        }
    }

    // Markers: the extra series under the prediction.
    if let Some((_, values)) = plot.extra {
        for (g, &v) in values.iter().enumerate() {
            root.draw(&TriangleMarker::new(px(xc(g), yp(v)), 6, EXTRA_COLOUR.filled())).map_err(draw_err)?;
        }
    }
    for (g, &v) in plot.predicted.iter().enumerate() {
        root.draw(&Circle::new(px(xc(g), yp(v)), 5, PREDICTED_COLOUR.filled())).map_err(draw_err)?;
    }

    // Gene names under their ticks, reading upwards and ending at the axis (matplotlib's
    // `rotation=90`).
    let gene_style =
        TextStyle::from((FONT, GENE_SIZE).into_font()).transform(FontTransform::Rotate270).pos(Pos::new(HPos::Right, VPos::Center));
    let max_w = (GENE_H - 14) as u32;
    for (g, gene) in plot.genes.iter().enumerate() {
        let c = xc(g).round() as i32;
        root.draw(&PathElement::new(vec![(c, y1), (c, y1 + 4)], axis_line)).map_err(draw_err)?;
        root.draw_text(&fit(gene, GENE_SIZE, max_w), &gene_style, (c + (GENE_SIZE / 2.0) as i32, y1 + 8)).map_err(draw_err)?;
    }

    if let Some((name, _)) = plot.extra {
        let legend = TextStyle::from((FONT, LEGEND_SIZE).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        let first = "predicted";
        let second = fit(name, LEGEND_SIZE, 240);
        let w1 = text_width(first, LEGEND_SIZE) as i32;
        let w2 = text_width(&second, LEGEND_SIZE) as i32;
        let total = 16 + w1 + 24 + 16 + w2;
        let ly = y1 + GENE_H + LEGEND_H / 2;
        let mut lx = (x0 + x1) / 2 - total / 2;
        root.draw(&Circle::new((lx + 5, ly), 5, PREDICTED_COLOUR.filled())).map_err(draw_err)?;
        root.draw_text(first, &legend, (lx + 16, ly)).map_err(draw_err)?;
        lx += 16 + w1 + 24;
        root.draw(&TriangleMarker::new((lx + 5, ly), 6, EXTRA_COLOUR.filled())).map_err(draw_err)?;
        root.draw_text(&second, &legend, (lx + 16, ly)).map_err(draw_err)?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    /// Literals from numpy 2 / matplotlib 3.11 (`cbook.boxplot_stats(x.astype(np.float32)
    /// .astype(np.float64))`): q1, median, q3, whisker low, whisker high.
    #[test]
    fn box_stats_match_matplotlib() {
        let cases: [(&[f32], [f64; 5]); 8] = [
            (&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0], [3.25, 5.5, 7.75, 1.0, 9.0]),
            (&[0.5, -1.25, 3.0, 2.0, -0.75, 10.0, -8.5, 1.5, 0.0], [-0.75, 0.5, 2.0, -1.25, 3.0]),
            (&[2.5], [2.5, 2.5, 2.5, 2.5, 2.5]),
            (&[1.0, 4.0], [1.75, 2.5, 3.25, 1.0, 4.0]),
            (&[0.0, 0.0, 0.0, 0.0, 0.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]),
            (
                &[-3.2, -1.1, 0.4, 0.9, 1.3, 2.2, 2.8, 7.7, -9.9, 0.05, 0.6],
                [-0.5250000115483999, 0.6000000238418579, 1.75, -3.200000047683716, 2.799999952316284],
            ),
            (
                &[0.3, -1.7, 2.9, 0.11, 5.3, -0.45],
                [-0.3099999912083149, 0.20500000566244125, 2.250000074505806, -1.7000000476837158, 5.300000190734863],
            ),
            (
                &[
                    0.004, 0.896, -0.822, -2.672, -1.364, -2.975, 0.18, 4.021, -1.477, -1.861, 1.47, 1.071, 0.316, -2.791, -0.088, 2.086,
                    -4.033, -1.373, -5.704, -3.869, 25.0, -30.0,
                ],
                [-2.7612498998641968, -1.0929999947547913, 0.7510000243782997, -5.703999996185303, 4.020999908447266],
            ),
        ];
        for (values, want) in cases {
            let s = box_stats(values).unwrap();
            let got = [s.q1, s.median, s.q3, s.whisker_low, s.whisker_high];
            for (g, w) in got.iter().zip(want) {
                assert!(close(*g, w), "{values:?}: got {got:?}, numpy {want:?}");
            }
        }
        assert_eq!(box_stats(&[]), None);
        assert_eq!(box_stats(&[1.0, f32::NAN]), None);
    }

    #[test]
    fn ticks_are_round() {
        let (t, d) = ticks(-0.37, 1.12);
        assert_eq!(d, 2);
        assert_eq!(t.len(), 6, "{t:?}");
        assert!(close(t[0], -0.25) && close(t[5], 1.0), "{t:?}");
        let (t, d) = ticks(-3.0, 12.0);
        assert_eq!((t, d), (vec![-2.5, 0.0, 2.5, 5.0, 7.5, 10.0], 1));
    }
}
