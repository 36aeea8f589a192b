//! Cell-type annotation metrics, computed as scikit-learn computes them so that numbers can be
//! compared with published ones: `precision_recall_fscore_support` with `labels=None` (the
//! sorted union of true and predicted labels) and `zero_division` giving 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::atomic;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// True cells of this label.
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    pub n_cells: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub macro_precision: f64,
    pub macro_recall: f64,
    /// F1 averaged with the true-label support as weights.
    pub weighted_f1: f64,
    /// The sorted union of true and predicted labels: the averaging set and the confusion axes.
    pub labels: Vec<String>,
    pub per_class: BTreeMap<String, ClassMetrics>,
    /// True labels absent from the training classes: no classifier trained on them can be right.
    pub unseen_labels: Vec<String>,
    /// Counts, rows = true label, columns = predicted label, both in `labels` order. Kept out of
    /// metrics.json: confusion.csv holds it.
    #[serde(skip)]
    pub confusion: Vec<Vec<u64>>,
}

/// `num / den`, or 0 where sklearn would warn about a zero denominator.
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl ClassificationReport {
    pub fn new(truth: &[String], pred: &[String], train_classes: &[String]) -> Result<Self> {
        if truth.len() != pred.len() {
            bail!("{} true labels but {} predictions", truth.len(), pred.len());
        }
        if truth.is_empty() {
            bail!("no cells to evaluate");
        }
        let labels: Vec<String> = truth.iter().chain(pred).cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let pos: HashMap<&str, usize> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
        let k = labels.len();
        let mut confusion = vec![vec![0u64; k]; k];
        for (t, p) in truth.iter().zip(pred) {
            confusion[pos[t.as_str()]][pos[p.as_str()]] += 1;
        }

        let mut per_class = BTreeMap::new();
        let (mut sum_p, mut sum_r, mut sum_f, mut weighted_f) = (0.0, 0.0, 0.0, 0.0);
        for (c, label) in labels.iter().enumerate() {
            let tp = confusion[c][c];
            let support: u64 = confusion[c].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            // sklearn's form: equal to 2PR/(P+R) where defined, and 0 (not NaN) where not.
            let f1 = ratio(2 * tp, predicted + support);
            sum_p += precision;
            sum_r += recall;
            sum_f += f1;
            weighted_f += f1 * support as f64;
            per_class.insert(label.clone(), ClassMetrics { precision, recall, f1, support: support as usize });
        }
        let n = truth.len();
        let correct: u64 = (0..k).map(|c| confusion[c][c]).sum();
        let train: BTreeSet<&str> = train_classes.iter().map(String::as_str).collect();
        let unseen_labels = truth
            .iter()
            .map(String::as_str)
            .filter(|t| !train.contains(t))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(str::to_string)
            .collect();
        Ok(ClassificationReport {
            n_cells: n,
            accuracy: correct as f64 / n as f64,
            macro_f1: sum_f / k as f64,
            macro_precision: sum_p / k as f64,
            macro_recall: sum_r / k as f64,
            weighted_f1: weighted_f / n as f64,
            labels,
            per_class,
            unseen_labels,
            confusion,
        })
    }

    /// `dir/metrics.json`.
    pub fn write_metrics_json(&self, dir: &Path) -> Result<PathBuf> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        atomic::write(dir, "metrics.json", text.as_bytes())
    }

    /// `dir/confusion.csv`: header `true\predicted,<labels>`, then one row per true label.
    pub fn write_confusion_csv(&self, dir: &Path) -> Result<PathBuf> {
        let mut out = String::from("true\\predicted");
        for l in &self.labels {
            out.push(',');
            out.push_str(&csv_field(l));
        }
        out.push('\n');
        for (l, row) in self.labels.iter().zip(&self.confusion) {
            out.push_str(&csv_field(l));
            for v in row {
                out.push_str(&format!(",{v}"));
            }
            out.push('\n');
        }
        atomic::write(dir, "confusion.csv", out.as_bytes())
    }

    /// `dir/confusion.png`: the row-normalised confusion matrix as a heatmap.
    pub fn write_confusion_png(&self, dir: &Path) -> Result<PathBuf> {
        let title =
            format!("Confusion (row-normalised), {} cells, accuracy {:.3}, macro F1 {:.3}", self.n_cells, self.accuracy, self.macro_f1);
        crate::heatmap::write_confusion_png(dir, "confusion.png", &self.labels, &self.confusion, &title)
    }

    /// metrics.json, confusion.csv and confusion.png in `dir`.
    pub fn write_all(&self, dir: &Path) -> Result<()> {
        self.write_metrics_json(dir)?;
        self.write_confusion_csv(dir)?;
        self.write_confusion_png(dir)?;
        Ok(())
    }

    /// A short plain-text summary: the averages, then one line per label.
    pub fn table(&self) -> String {
        let width = self.labels.iter().map(|l| l.chars().count()).max().unwrap_or(5).max(5);
        let mut s = format!(
            "cells {}  accuracy {:.4}  macro F1 {:.4}  weighted F1 {:.4}  macro precision {:.4}  macro recall {:.4}\n",
            self.n_cells, self.accuracy, self.macro_f1, self.weighted_f1, self.macro_precision, self.macro_recall
        );
        s.push_str(&format!("{:<width$}  {:>9}  {:>6}  {:>6}  {:>7}\n", "label", "precision", "recall", "f1", "support"));
        for (l, m) in &self.per_class {
            s.push_str(&format!("{:<width$}  {:>9.3}  {:>6.3}  {:>6.3}  {:>7}\n", l, m.precision, m.recall, m.f1, m.support));
        }
        if !self.unseen_labels.is_empty() {
            s.push_str(&format!("true labels not in training: {}\n", self.unseen_labels.join(", ")));
        }
        s
    }
}

/// RFC 4180 quoting, for labels with commas or quotes (`CD4+/CD45RA+/CD25- Naive T` has none,
/// but free-text annotations do).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn hand_computed() {
        // truth a a a b b c ; pred a a b b c c
        let t = v(&["a", "a", "a", "b", "b", "c"]);
        let p = v(&["a", "a", "b", "b", "c", "c"]);
        let r = ClassificationReport::new(&t, &p, &v(&["a", "b", "c"])).unwrap();
        close(r.accuracy, 4.0 / 6.0);
        // a: P 2/2 R 2/3 F 0.8 ; b: P 1/2 R 1/2 F 0.5 ; c: P 1/2 R 1 F 2/3
        close(r.per_class["a"].f1, 0.8);
        close(r.per_class["b"].precision, 0.5);
        close(r.per_class["c"].f1, 2.0 / 3.0);
        close(r.macro_precision, (1.0 + 0.5 + 0.5) / 3.0);
        close(r.macro_recall, (2.0 / 3.0 + 0.5 + 1.0) / 3.0);
        close(r.macro_f1, (0.8 + 0.5 + 2.0 / 3.0) / 3.0);
        close(r.weighted_f1, (0.8 * 3.0 + 0.5 * 2.0 + 2.0 / 3.0) / 6.0);
        assert_eq!(r.confusion, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        assert!(r.unseen_labels.is_empty());
    }

    #[test]
    fn predicted_label_not_in_truth_and_unseen_truth() {
        // "z" is only predicted: support 0, precision 0, recall 0 (zero_division), counted in
        // the macro average as sklearn does. "b" is only true: precision 0 (never predicted).
        let t = v(&["a", "a", "b", "b"]);
        let p = v(&["a", "z", "a", "a"]);
        let r = ClassificationReport::new(&t, &p, &v(&["a", "z"])).unwrap();
        assert_eq!(r.labels, v(&["a", "b", "z"]));
        close(r.accuracy, 0.25);
        let a = &r.per_class["a"]; // tp 1, predicted 3, support 2
        close(a.precision, 1.0 / 3.0);
        close(a.recall, 0.5);
        close(a.f1, 0.4);
        let z = &r.per_class["z"];
        assert_eq!(z.support, 0);
        assert_eq!((z.precision, z.recall, z.f1), (0.0, 0.0, 0.0));
        let b = &r.per_class["b"];
        assert_eq!((b.precision, b.recall, b.f1, b.support), (0.0, 0.0, 0.0, 2));
        close(r.macro_f1, 0.4 / 3.0);
        close(r.macro_precision, 1.0 / 9.0);
        close(r.macro_recall, 0.5 / 3.0);
        // Weighted by support: the zero-support class weighs nothing.
        close(r.weighted_f1, 0.4 * 2.0 / 4.0);
        assert_eq!(r.unseen_labels, v(&["b"]));
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        assert!(ClassificationReport::new(&v(&["a"]), &v(&[]), &[]).is_err());
        assert!(ClassificationReport::new(&[], &[], &[]).is_err());
    }

    #[test]
    fn files() {
        let dir = tempfile::tempdir().unwrap();
        let t = v(&["x,1", "b", "b", "c"]);
        let p = v(&["x,1", "b", "c", "d"]);
        let r = ClassificationReport::new(&t, &p, &t).unwrap();
        r.write_all(dir.path()).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("confusion.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "true\\predicted,b,c,d,\"x,1\"");
        assert_eq!(lines[1], "b,1,1,0,0");
        assert_eq!(lines[4], "\"x,1\",0,0,0,1");
        assert_eq!(lines.len(), 5);
        let back: ClassificationReport = serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).unwrap()).unwrap();
        assert_eq!(back.accuracy, r.accuracy);
        assert_eq!(back.per_class, r.per_class);
        let png = std::fs::read(dir.path().join("confusion.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
    }
}
