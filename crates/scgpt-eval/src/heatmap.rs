//! The confusion-matrix picture. Text is drawn with the bundled DejaVu Sans through ab_glyph so
//! that no system font library (fontconfig) is needed at build or run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use crate::atomic;

pub(crate) const FONT: &str = "sans-serif";
static DEJAVU: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

pub(crate) fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the bundled DejaVu Sans font could not be parsed"))
    }
}

/// matplotlib's "Blues" at five stops, interpolated linearly.
fn blues(v: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)];
    let v = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (v.floor() as usize).min(STOPS.len() - 2);
    let t = v - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

pub(crate) fn text_width(text: &str, size: f64) -> u32 {
    (FONT, size).into_font().box_size(text).map(|(w, _)| w).unwrap_or((text.len() as f64 * size * 0.6) as u32)
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the confusion matrix: {e}")
}

/// Writes `dir/name`: `counts` (rows true, columns predicted, in `labels` order) with each row
/// divided by its total; rows without true cells are grey.
pub(crate) fn write_confusion_png(dir: &Path, name: &str, labels: &[String], counts: &[Vec<u64>], title: &str) -> Result<PathBuf> {
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
    let tmp = atomic::temp_path(dir, name);
    let result = draw(&tmp, labels, counts, title);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    atomic::commit(&tmp, dir, name)
}

fn draw(path: &Path, labels: &[String], counts: &[Vec<u64>], title: &str) -> Result<()> {
    let n = labels.len().max(1) as u32;
    let label_size = 14.0;
    let cell = (720 / n).clamp(16, 56);
    let label_w = labels.iter().map(|l| text_width(l, label_size)).max().unwrap_or(0).min(360);
    let pad = 16;
    let title_h = 40;
    let left = pad + 24 + label_w + 8;
    let top = pad + title_h;
    let grid = n * cell;
    let bar_x = left + grid + 24;
    let width = (bar_x + 20 + 60 + pad).max(text_width(title, 18.0) + 2 * pad);
    let height = top + grid + 8 + label_w + 32 + pad;

    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let centre = Pos::new(HPos::Center, VPos::Center);
    let title_style = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw_text(title, &title_style, ((width / 2) as i32, pad as i32)).map_err(draw_err)?;

    let label_style = TextStyle::from((FONT, label_size).into_font());
    let row_style = label_style.pos(Pos::new(HPos::Right, VPos::Center));
    let col_style = label_style.transform(FontTransform::Rotate90).pos(Pos::new(HPos::Left, VPos::Center));
    let (left, top, cell) = (left as i32, top as i32, cell as i32);
    let show_values = cell >= 28;
    let value_size = (cell as f64 * 0.32).min(13.0);
    for (r, row) in counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let y = top + r as i32 * cell;
        root.draw_text(&labels[r], &row_style, (left - 8, y + cell / 2)).map_err(draw_err)?;
        for (c, &k) in row.iter().enumerate() {
            let x = left + c as i32 * cell;
            let frac = if total == 0 { None } else { Some(k as f64 / total as f64) };
            let fill = frac.map(blues).unwrap_or(RGBColor(220, 220, 220));
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled())).map_err(draw_err)?;
            if let (true, Some(f)) = (show_values && k > 0, frac) {
                let colour = if f > 0.5 { WHITE } else { BLACK };
                let style = TextStyle::from((FONT, value_size).into_font()).color(&colour).pos(centre);
                root.draw_text(&format!("{f:.2}"), &style, (x + cell / 2, y + cell / 2)).map_err(draw_err)?;
            }
        }
    }
    let grid = grid as i32;
    root.draw(&Rectangle::new([(left, top), (left + grid, top + grid)], BLACK.stroke_width(1))).map_err(draw_err)?;
    for (c, l) in labels.iter().enumerate() {
        // Rotated a quarter turn clockwise: the label reads downwards from under its column.
        let x = left + c as i32 * cell + cell / 2;
        root.draw_text(l, &col_style, (x - (label_size / 2.0) as i32, top + grid + 8)).map_err(draw_err)?;
    }
    let axis = TextStyle::from((FONT, 16).into_font()).pos(centre);
    root.draw_text("predicted", &axis, (left + grid / 2, top + grid + 8 + label_w as i32 + 18)).map_err(draw_err)?;
    let axis_v = axis.transform(FontTransform::Rotate270);
    root.draw_text("true", &axis_v, (pad as i32 + 8, top + grid / 2)).map_err(draw_err)?;

    // Colour scale: 0 at the bottom, 1 at the top.
    let bar_x = bar_x as i32;
    let steps = grid.max(1);
    for i in 0..steps {
        let v = 1.0 - i as f64 / steps as f64;
        root.draw(&Rectangle::new([(bar_x, top + i), (bar_x + 20, top + i + 1)], blues(v).filled())).map_err(draw_err)?;
    }
    root.draw(&Rectangle::new([(bar_x, top), (bar_x + 20, top + grid)], BLACK.stroke_width(1))).map_err(draw_err)?;
    let tick_style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = top + ((1.0 - t) * grid as f64).round() as i32;
        root.draw(&PathElement::new(vec![(bar_x + 20, y), (bar_x + 24, y)], BLACK)).map_err(draw_err)?;
        root.draw_text(&format!("{t:.2}"), &tick_style, (bar_x + 27, y)).map_err(draw_err)?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
