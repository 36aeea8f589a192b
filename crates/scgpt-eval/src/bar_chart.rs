//! A horizontal bar chart of ranked scores, one bar per named item from the top down (the top
//! targets of `scgpt grn attention`). Bars start at zero, so negative scores point left; each
//! bar carries its value. Text is the bundled DejaVu Sans (`heatmap.rs`); the file is written
//! under a temporary name and renamed into place.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::atomic;
use crate::heatmap::{register_font, text_width, FONT};

/// What to draw: `labels[i]` with `values[i]`, top to bottom.
#[derive(Debug, Clone, Copy)]
pub struct BarChart<'a> {
    pub title: &'a str,
    /// Under the value axis.
    pub value_label: &'a str,
    pub labels: &'a [String],
    pub values: &'a [f64],
}

/// Writes `dir/name` (a `.png`). Values must be finite; at least one bar.
pub fn write_bar_chart_png(dir: &Path, name: &str, chart: &BarChart) -> Result<PathBuf> {
    if chart.labels.len() != chart.values.len() {
        bail!("bar chart: {} labels for {} values", chart.labels.len(), chart.values.len());
    }
    if chart.labels.is_empty() {
        bail!("bar chart {name}: nothing to draw");
    }
    if let Some(v) = chart.values.iter().find(|v| !v.is_finite()) {
        bail!("bar chart {name}: the value {v} cannot be drawn");
    }
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
    let tmp = atomic::temp_path(dir, name);
    if let Err(e) = draw(&tmp, chart) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    atomic::commit(&tmp, dir, name)
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the bar chart: {e}")
}

/// The value printed at a bar's end: 3 significant digits.
fn value_text(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    format!("{v:.digits$}")
}

fn draw(path: &Path, c: &BarChart) -> Result<()> {
    let n = c.labels.len() as u32;
    let (label_size, value_size) = (14.0, 12.0);
    let pad = 16u32;
    let title_h = 40u32;
    let row = 24u32;
    let label_w = c.labels.iter().map(|l| text_width(l, label_size)).max().unwrap_or(0).min(280);
    let value_w = c.values.iter().map(|&v| text_width(&value_text(v), value_size)).max().unwrap_or(0);
    // Room for values left of the bars only when some bar points left.
    let left_value_w = if c.values.iter().any(|&v| v < 0.0) { value_w + 6 } else { 0 };
    let plot_w = 520u32;
    let left = pad + label_w + 10 + left_value_w;
    let width = (left + plot_w + value_w + 6 + pad).max(text_width(c.title, 18.0) + 2 * pad);
    let top = pad + title_h;
    let height = top + n * row + 12 + 20 + 8 + 20 + pad;

    let (lo, hi) = c.values.iter().fold((0f64, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi - lo > 0.0 { (lo, hi) } else { (0.0, 1.0) };
    let x_of = |v: f64| left as i32 + ((v - lo) / (hi - lo) * plot_w as f64).round() as i32;
    let zero = x_of(0.0);

    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let title_style = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw_text(c.title, &title_style, ((width / 2) as i32, pad as i32)).map_err(draw_err)?;

    let label_style = TextStyle::from((FONT, label_size).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    let positive = RGBColor(49, 130, 189);
    let negative = RGBColor(222, 45, 38);
    for (i, (label, &v)) in c.labels.iter().zip(c.values).enumerate() {
        let y0 = (top + i as u32 * row) as i32;
        let mid = y0 + row as i32 / 2;
        root.draw_text(label, &label_style, ((left - left_value_w) as i32 - 10, mid)).map_err(draw_err)?;
        let x = x_of(v);
        let (a, b) = if x >= zero { (zero, x) } else { (x, zero) };
        let colour = if v >= 0.0 { positive } else { negative };
        root.draw(&Rectangle::new([(a, y0 + 3), (b.max(a + 1), y0 + row as i32 - 3)], colour.filled())).map_err(draw_err)?;
        let (anchor, at) = if v >= 0.0 { (HPos::Left, b + 4) } else { (HPos::Right, a - 4) };
        let style = TextStyle::from((FONT, value_size).into_font()).pos(Pos::new(anchor, VPos::Center));
        root.draw_text(&value_text(v), &style, (at, mid)).map_err(draw_err)?;
    }

    // Zero line and the value axis with ticks at lo, 0 and hi.
    let bottom = (top + n * row) as i32;
    let black = BLACK.stroke_width(1);
    root.draw(&PathElement::new(vec![(zero, top as i32 - 2), (zero, bottom + 2)], black)).map_err(draw_err)?;
    let axis_y = bottom + 12;
    root.draw(&PathElement::new(vec![(x_of(lo), axis_y), (x_of(hi), axis_y)], black)).map_err(draw_err)?;
    let tick_style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    let mut ticks = vec![lo, hi];
    if lo < 0.0 && hi > 0.0 {
        ticks.push(0.0);
    }
    for t in ticks {
        let x = x_of(t);
        root.draw(&PathElement::new(vec![(x, axis_y), (x, axis_y + 4)], black)).map_err(draw_err)?;
        root.draw_text(&value_text(t), &tick_style, (x, axis_y + 6)).map_err(draw_err)?;
    }
    let axis_style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw_text(c.value_label, &axis_style, ((left + plot_w / 2) as i32, axis_y + 28)).map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_decodable_png_with_negative_bars() {
        let dir = tempfile::tempdir().unwrap();
        let labels: Vec<String> = ["GATA1", "TAL1", "a-much-longer-gene-name", "KLF1"].iter().map(|s| s.to_string()).collect();
        let values = [0.31, 0.05, 0.0, -0.12];
        let chart = BarChart { title: "BHLHE40: attention difference", value_label: "difference", labels: &labels, values: &values };
        let p = write_bar_chart_png(dir.path(), "top.png", &chart).unwrap();
        let decoder = png::Decoder::new(std::fs::File::open(&p).unwrap());
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert!(info.width > 500 && info.height > 4 * 24, "{}x{}", info.width, info.height);
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec!["A".to_string()];
        let e = write_bar_chart_png(dir.path(), "x.png", &BarChart { title: "t", value_label: "v", labels: &labels, values: &[f64::NAN] })
            .unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        assert!(write_bar_chart_png(dir.path(), "x.png", &BarChart { title: "t", value_label: "v", labels: &[], values: &[] }).is_err());
    }

    #[test]
    fn values_print_with_three_significant_digits() {
        assert_eq!(value_text(0.31234), "0.312");
        assert_eq!(value_text(-0.0123456), "-0.0123");
        assert_eq!(value_text(12.5), "12.5");
        assert_eq!(value_text(0.0), "0");
    }
}
