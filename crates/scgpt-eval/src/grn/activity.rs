//! Program activity as scGPT's `GeneEmbedding.score_metagenes` computes it: scanpy's
//! `score_genes` per program ([`super::score`]), then each program's scores min–max scaled over
//! the cells with scikit-learn's `MinMaxScaler`; and `plot_metagenes_scores`'s table, the mean
//! scaled score of each program per cell type.
//!
//! Where the original catches any error of `score_genes` and sets the program's scores to 0, we
//! return the error, naming the program.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::atomic;

use super::gmt::GeneSet;
use super::score::{GeneScore, GeneScorer, ScoreGenesOptions};

/// scikit-learn's `MinMaxScaler().fit_transform` of one column: `x·s + (0 − min·s)` with
/// `s = 1 / (max − min)`, and `s = 1` when the range is below 10·ε (a constant column maps to 0).
pub fn min_max_scale(x: &[f64]) -> Vec<f64> {
    let (lo, hi) = x.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let range = hi - lo;
    let scale = 1.0 / if range < 10.0 * f64::EPSILON { 1.0 } else { range };
    let min = 0.0 - lo * scale;
    x.iter().map(|&v| v * scale + min).collect()
}

/// Per program: scanpy's raw scores, the scaled activity, and the scoring details.
#[derive(Debug, Clone)]
pub struct ProgramActivity {
    pub programs: Vec<String>,
    /// Min–max scaled scores, per program, per cell.
    pub activity: Vec<Vec<f64>>,
    pub details: Vec<GeneScore>,
}

/// Scores every program on the scorer's matrix (each call seeds numpy's generator anew, as
/// each `sc.tl.score_genes` call does).
pub fn program_activity(scorer: &GeneScorer, programs: &[GeneSet], opts: &ScoreGenesOptions) -> Result<ProgramActivity> {
    let mut out = ProgramActivity { programs: Vec::new(), activity: Vec::new(), details: Vec::new() };
    for p in programs {
        let s = scorer.score(&p.genes, opts).map_err(|e| e.context(format!("scoring program {}", p.name)))?;
        out.programs.push(p.name.clone());
        out.activity.push(min_max_scale(&s.scores));
        out.details.push(s);
    }
    Ok(out)
}

/// Mean activity of each program per cell type.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityTable {
    pub programs: Vec<String>,
    /// Cell types in sorted order.
    pub cell_types: Vec<String>,
    pub n_cells: Vec<usize>,
    /// `mean[p][t]`: program p's mean scaled score over the cells of type t.
    pub mean: Vec<Vec<f64>>,
}

/// Groups the cells by `labels` (one per cell; the label column).
pub fn activity_by_cell_type(activity: &ProgramActivity, labels: &[String]) -> Result<ActivityTable> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        groups.entry(l.as_str()).or_default().push(i);
    }
    for (p, a) in activity.programs.iter().zip(&activity.activity) {
        if a.len() != labels.len() {
            bail!("program activity: program {p} has scores for {} cells but {} cell labels were given", a.len(), labels.len());
        }
    }
    if labels.is_empty() {
        bail!("program activity: no cells to group by cell type");
    }
    let mean = activity
        .activity
        .iter()
        .map(|a| groups.values().map(|cells| cells.iter().map(|&i| a[i]).sum::<f64>() / cells.len() as f64).collect())
        .collect();
    Ok(ActivityTable {
        programs: activity.programs.clone(),
        cell_types: groups.keys().map(|s| s.to_string()).collect(),
        n_cells: groups.values().map(Vec::len).collect(),
        mean,
    })
}

/// A CSV field, quoted when it holds a comma, quote or line break.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl ActivityTable {
    /// `program,<type>,<type>...` then one row per program.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("program");
        for t in &self.cell_types {
            s.push(',');
            s.push_str(&csv_field(t));
        }
        s.push('\n');
        for (p, row) in self.programs.iter().zip(&self.mean) {
            s.push_str(&csv_field(p));
            for v in row {
                s.push_str(&format!(",{v}"));
            }
            s.push('\n');
        }
        s
    }

    /// Writes [`ActivityTable::to_csv`] to `dir/name` atomically.
    pub fn write_csv(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        atomic::write(dir, name, self.to_csv().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_and_table() {
        assert_eq!(min_max_scale(&[2.0, 4.0, 3.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(min_max_scale(&[5.0, 5.0]), vec![0.0, 0.0]);
        let a = ProgramActivity { programs: vec!["0".into()], activity: vec![vec![0.0, 1.0, 0.5]], details: vec![] };
        let labels: Vec<String> = ["T, cd4", "B", "B"].map(String::from).to_vec();
        let t = activity_by_cell_type(&a, &labels).unwrap();
        assert_eq!(t.cell_types, vec!["B".to_string(), "T, cd4".to_string()]);
        assert_eq!((t.n_cells.clone(), t.mean.clone()), (vec![2, 1], vec![vec![0.75, 0.0]]));
        assert_eq!(t.to_csv(), "program,B,\"T, cd4\"\n0,0.75,0\n");
        assert!(activity_by_cell_type(&a, &labels[..2]).is_err());
    }
}
