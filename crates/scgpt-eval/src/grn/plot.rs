//! Pictures: one program's similarity network (genes on a circle, an edge wherever the cosine
//! similarity exceeds a threshold, as the tutorial highlights edges above 0.4), and the heatmap of
//! program activity by cell type (the tutorial's clustermap without the dendrograms; rows scaled
//! to [0, 1] as seaborn's `standard_scale=0` does, when asked). Text uses the bundled font.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use crate::atomic;
use crate::heatmap::{register_font, text_width, FONT};

use super::activity::ActivityTable;
use super::embedding::GeneEmbeddings;

/// More genes than this make an unreadable circle.
pub const MAX_NETWORK_GENES: usize = 400;
/// Heatmap limits (rows, columns): beyond them the picture is unreadable and its bitmap huge.
pub const MAX_HEATMAP_PROGRAMS: usize = 2000;
pub const MAX_HEATMAP_CELL_TYPES: usize = 300;

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the GRN picture: {e}")
}

/// Draws into a temporary file next to `dir/name`, then renames it into place.
fn write_png(dir: &Path, name: &str, draw: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
    let tmp = atomic::temp_path(dir, name);
    if let Err(e) = draw(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    atomic::commit(&tmp, dir, name)
}

fn mix(a: (u8, u8, u8), b: (u8, u8, u8), t: f64) -> RGBColor {
    let m = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t.clamp(0.0, 1.0)).round() as u8;
    RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// seaborn's "mako" at five stops (dark to light), interpolated linearly.
fn mako(v: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [(11, 4, 5), (62, 53, 107), (53, 123, 162), (73, 193, 173), (222, 245, 229)];
    let v = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (v.floor() as usize).min(STOPS.len() - 2);
    mix(STOPS[i], STOPS[i + 1], v - i as f64)
}

/// Writes `dir/name`: the genes `genes` (indices into `emb`) on a circle, labelled, with an edge
/// for every pair whose cosine similarity exceeds `threshold` (darker and wider when higher).
/// A pair of distinct genes with identical vectors is an edge like any other.
pub fn write_program_network_png(
    dir: &Path,
    name: &str,
    emb: &GeneEmbeddings,
    genes: &[usize],
    threshold: f64,
    title: &str,
) -> Result<PathBuf> {
    if genes.is_empty() {
        bail!("program network picture: no gene to draw");
    }
    if genes.len() > MAX_NETWORK_GENES {
        bail!("program network picture: {} genes; at most {MAX_NETWORK_GENES} fit on the circle", genes.len());
    }
    if let Some(&bad) = genes.iter().find(|&&g| g >= emb.len()) {
        bail!("program network picture: gene index {bad} is out of range for {} genes", emb.len());
    }
    if genes.iter().collect::<HashSet<_>>().len() != genes.len() {
        bail!("program network picture: a gene is listed twice");
    }
    if !(threshold.is_finite() && (-1.0..1.0).contains(&threshold)) {
        bail!("program network picture: the edge threshold {threshold} must be a cosine in [-1, 1)");
    }
    let sims = emb.cosine_block(genes, genes)?;
    let n = genes.len();
    let mut edges: Vec<(usize, usize, f64)> = Vec::new();
    for a in 0..n {
        for b in a + 1..n {
            let c = sims[a * n + b].max(sims[b * n + a]);
            if c > threshold {
                edges.push((a, b, c));
            }
        }
    }
    edges.sort_by(|x, y| x.2.total_cmp(&y.2)); // strongest drawn last, on top
    let labels: Vec<&str> = genes.iter().map(|&g| emb.genes()[g].as_str()).collect();
    write_png(dir, name, |path| {
        let font = if n <= 40 {
            14.0
        } else if n <= 120 {
            11.0
        } else {
            8.0
        };
        let label_w = labels.iter().map(|l| text_width(l, font)).max().unwrap_or(0).min(220) as i32;
        let radius = 320i32;
        let side = 2 * (radius + label_w + 36);
        let (width, height) = (side.max(text_width(title, 18.0) as i32 + 40), side + 70);
        let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let title_style = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw_text(title, &title_style, (width / 2, 14)).map_err(draw_err)?;
        let note = format!("{n} genes, {} edges with cosine > {threshold:.2}", edges.len());
        let note_style = TextStyle::from((FONT, 13).into_font()).color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw_text(&note, &note_style, (width / 2, 40)).map_err(draw_err)?;
        let (cx, cy) = (width / 2, 70 + side / 2);
        let angle = |a: usize| 2.0 * std::f64::consts::PI * a as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
        let at = |a: usize, r: f64| (cx + (r * angle(a).cos()).round() as i32, cy + (r * angle(a).sin()).round() as i32);
        for &(a, b, c) in &edges {
            let t = if threshold < 1.0 { (c - threshold) / (1.0 - threshold) } else { 1.0 };
            let colour = mix((200, 210, 225), (20, 60, 140), t);
            let w = 1 + (t * 3.0).round() as u32;
            root.draw(&PathElement::new(vec![at(a, radius as f64), at(b, radius as f64)], colour.stroke_width(w))).map_err(draw_err)?;
        }
        for (a, l) in labels.iter().enumerate() {
            root.draw(&Circle::new(at(a, radius as f64), 6, RGBColor(214, 39, 40).filled())).map_err(draw_err)?;
            let (dx, dy) = (angle(a).cos(), angle(a).sin());
            let h = if dx > 0.3 {
                HPos::Left
            } else if dx < -0.3 {
                HPos::Right
            } else {
                HPos::Center
            };
            let v = if dy > 0.3 {
                VPos::Top
            } else if dy < -0.3 {
                VPos::Bottom
            } else {
                VPos::Center
            };
            let style = TextStyle::from((FONT, font).into_font()).pos(Pos::new(h, v));
            root.draw_text(l, &style, at(a, radius as f64 + 12.0)).map_err(draw_err)?;
        }
        root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        Ok(())
    })
}

/// Writes `dir/name`: programs (rows) by cell types (columns), coloured by mean activity. With
/// `scale_rows` each row is first scaled to [0, 1] (seaborn's `standard_scale=0`, which the
/// tutorial uses); a constant row is then undefined and drawn grey.
pub fn write_activity_heatmap_png(dir: &Path, name: &str, table: &ActivityTable, title: &str, scale_rows: bool) -> Result<PathBuf> {
    let (np, nt) = (table.programs.len(), table.cell_types.len());
    if np == 0 || nt == 0 {
        bail!("activity heatmap: the table has {np} programs and {nt} cell types; it needs at least one of each");
    }
    if np > MAX_HEATMAP_PROGRAMS || nt > MAX_HEATMAP_CELL_TYPES {
        bail!("activity heatmap: {np} programs × {nt} cell types; at most {MAX_HEATMAP_PROGRAMS} × {MAX_HEATMAP_CELL_TYPES} can be drawn");
    }
    if table.mean.len() != np || table.mean.iter().any(|r| r.len() != nt) {
        bail!("activity heatmap: the table's values are not {np} rows of {nt}");
    }
    if table.mean.iter().flatten().any(|v| !v.is_finite()) {
        bail!("activity heatmap: the table holds a non-finite value");
    }
    let values: Vec<Vec<Option<f64>>> = table
        .mean
        .iter()
        .map(|row| {
            let (lo, hi) = row.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            row.iter()
                .map(|&v| {
                    if !scale_rows {
                        Some(v)
                    } else if hi > lo {
                        Some((v - lo) / (hi - lo))
                    } else {
                        None
                    }
                })
                .collect()
        })
        .collect();
    let (vmin, vmax) = values.iter().flatten().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (vmin, vmax) = if vmin.is_finite() && vmax > vmin { (vmin, vmax) } else { (0.0, 1.0) };
    write_png(dir, name, |path| {
        let size = 13.0;
        let cell_h = (640 / np as i32).clamp(10, 28);
        let cell_w = (640 / nt as i32).clamp(14, 48);
        let row_w = table.programs.iter().map(|l| text_width(l, size)).max().unwrap_or(0).min(420) as i32;
        let col_h = table.cell_types.iter().map(|l| text_width(l, size)).max().unwrap_or(0).min(260) as i32;
        let (left, top) = (16 + row_w + 8, 52);
        let (gw, gh) = (nt as i32 * cell_w, np as i32 * cell_h);
        let bar_x = left + gw + 24;
        let width = (bar_x + 20 + 60 + 16).max(text_width(title, 18.0) as i32 + 32);
        let height = top + gh.max(120) + 8 + col_h + 24;
        let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let title_style = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw_text(title, &title_style, (width / 2, 14)).map_err(draw_err)?;
        let row_style = TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        let col_style =
            TextStyle::from((FONT, size).into_font()).transform(FontTransform::Rotate90).pos(Pos::new(HPos::Left, VPos::Center));
        for (r, row) in values.iter().enumerate() {
            let y = top + r as i32 * cell_h;
            if cell_h >= 10 {
                root.draw_text(&table.programs[r], &row_style, (left - 6, y + cell_h / 2)).map_err(draw_err)?;
            }
            for (c, v) in row.iter().enumerate() {
                let x = left + c as i32 * cell_w;
                let fill = v.map(|v| mako((v - vmin) / (vmax - vmin))).unwrap_or(RGBColor(210, 210, 210));
                root.draw(&Rectangle::new([(x, y), (x + cell_w, y + cell_h)], fill.filled())).map_err(draw_err)?;
            }
        }
        for (c, l) in table.cell_types.iter().enumerate() {
            let x = left + c as i32 * cell_w + cell_w / 2;
            root.draw_text(l, &col_style, (x - (size / 2.0) as i32, top + gh + 6)).map_err(draw_err)?;
        }
        let bar_h = gh.max(120);
        for i in 0..bar_h {
            let v = 1.0 - i as f64 / bar_h as f64;
            root.draw(&Rectangle::new([(bar_x, top + i), (bar_x + 20, top + i + 1)], mako(v).filled())).map_err(draw_err)?;
        }
        root.draw(&Rectangle::new([(bar_x, top), (bar_x + 20, top + bar_h)], BLACK.stroke_width(1))).map_err(draw_err)?;
        let tick = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        for t in [0.0, 0.5, 1.0] {
            let y = top + ((1.0 - t) * bar_h as f64).round() as i32;
            root.draw_text(&format!("{:.2}", vmin + t * (vmax - vmin)), &tick, (bar_x + 26, y)).map_err(draw_err)?;
        }
        root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        Ok(())
    })
}
