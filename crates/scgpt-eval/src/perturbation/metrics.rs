//! The perturbation metrics: scGPT's `compute_perturbation_metrics` (`pearson`, `pearson_de`,
//! `pearson_delta`, `pearson_de_delta`) and GEARS's non-dropout pair from `non_dropout_analysis`
//! (`pearson_top20_de_non_dropout`, `pearson_delta_top20_de_non_dropout`), per condition from the
//! true mean μ, the predicted mean μ̂ and the mean m over all control cells; deltas are μ − m.
//!
//! Where the originals disagree or produce NaN we say "undefined" and leave the condition out of
//! the mean, counting it (`n_undefined`), instead of letting it poison the mean (scGPT: NaN) or
//! count as 0 (GEARS's non-dropout metrics):
//! - μ all zero on the metric's genes: skipped, as scGPT does (for the DE metrics scGPT tests μ on
//!   the DE genes only);
//! - a constant vector on either side (scipy's `pearsonr` returns NaN), e.g. the zero delta of the
//!   no-change baseline, or fewer than two genes;
//! - no prediction (a baseline that does not cover the condition).
//!
//! scGPT averages float32 cell values in float32; we average in f64.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, ensure, Result};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::CsrMatrix;

/// The metric names, in the order of every `[_; 6]` below.
pub const METRICS: [&str; 6] =
    ["pearson", "pearson_de", "pearson_delta", "pearson_de_delta", "pearson_de_nodropout", "pearson_de_delta_nodropout"];

#[derive(Debug, Clone)]
pub struct MetricOptions {
    /// How many DE genes the `_de` metrics use (the first n of each list).
    pub n_de: usize,
}

impl Default for MetricOptions {
    fn default() -> Self {
        MetricOptions { n_de: 20 }
    }
}

/// One condition to score. Gene vectors are over the same genes as the control mean.
#[derive(Debug, Clone, Copy)]
pub struct ConditionInput<'a> {
    pub condition: &'a str,
    pub truth: &'a [f64],
    pub pred: Option<&'a [f64]>,
    /// Ranked DE genes (`rank_genes_groups_cov_all`, or [`super::DeGenes::top`]).
    pub de: &'a [usize],
    /// `top_non_dropout_de_20`.
    pub de_non_dropout: &'a [usize],
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConditionMetrics {
    pub condition: String,
    pub subgroup: Option<String>,
    /// In [`METRICS`] order; `None` where undefined (see the module header).
    pub values: [Option<f64>; 6],
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricSummary {
    /// Means over the conditions where each metric is defined; `None` if it is nowhere.
    pub values: [Option<f64>; 6],
    pub n_conditions: usize,
    pub n_undefined: [usize; 6],
}

/// What `metrics.json` holds: the metrics over all scored conditions, the same per subgroup,
/// and the per-condition rows (written separately, [`write_per_condition_csv`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PerturbationMetrics {
    pub overall: MetricSummary,
    pub subgroups: BTreeMap<String, MetricSummary>,
    pub per_condition: Vec<ConditionMetrics>,
}

/// scipy's `pearsonr` value, `None` where it would be NaN (a constant side, fewer than 2 points).
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 || x.iter().all(|&v| v == x[0]) || y.iter().all(|&v| v == y[0]) {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (da, db) = (a - mx, b - my);
        sxy += da * db;
        sxx += da * da;
        syy += db * db;
    }
    let r = sxy / (sxx.sqrt() * syy.sqrt());
    r.is_finite().then(|| r.clamp(-1.0, 1.0))
}

/// Mean expression of each group's cells (f64), `None` for a group without cells.
pub fn group_means(x: &CsrMatrix, cell_group: &[usize], n_groups: usize) -> Result<Vec<Option<Vec<f64>>>> {
    ensure!(cell_group.len() == x.n_rows(), "{} cells have a group but the matrix has {} rows", cell_group.len(), x.n_rows());
    let mut sums: Vec<Option<Vec<f64>>> = vec![None; n_groups];
    let mut n = vec![0usize; n_groups];
    for (i, &k) in cell_group.iter().enumerate() {
        ensure!(k < n_groups, "cell {i} is in group {k} but there are only {n_groups} groups");
        let s = sums[k].get_or_insert_with(|| vec![0.0; x.n_cols()]);
        n[k] += 1;
        let (idx, val) = x.row(i);
        for (&j, &v) in idx.iter().zip(val) {
            s[j as usize] += v as f64;
        }
    }
    Ok(sums.into_iter().zip(n).map(|(s, n)| s.map(|s| s.into_iter().map(|v| v / n as f64).collect())).collect())
}

fn pick(v: &[f64], idx: &[usize]) -> Vec<f64> {
    idx.iter().map(|&j| v[j]).collect()
}

fn score(c: &ConditionInput, m: &[f64], n_de: usize) -> [Option<f64>; 6] {
    let Some(pred) = c.pred else { return [None; 6] };
    let delta = |v: &[f64], idx: Option<&[usize]>| -> Vec<f64> {
        match idx {
            Some(idx) => idx.iter().map(|&j| v[j] - m[j]).collect(),
            None => v.iter().zip(m).map(|(a, b)| a - b).collect(),
        }
    };
    let all_zero = |v: &[f64]| v.iter().all(|&x| x == 0.0);
    let mut out = [None; 6];
    if !all_zero(c.truth) {
        out[0] = pearson(c.truth, pred);
        out[2] = pearson(&delta(c.truth, None), &delta(pred, None));
    }
    for (list, slot, delta_slot) in [(c.de, 1, 3), (c.de_non_dropout, 4, 5)] {
        let idx = &list[..list.len().min(n_de)];
        if !all_zero(&pick(c.truth, idx)) {
            out[slot] = pearson(&pick(c.truth, idx), &pick(pred, idx));
            out[delta_slot] = pearson(&delta(c.truth, Some(idx)), &delta(pred, Some(idx)));
        }
    }
    out
}

fn summarise<'a>(rows: impl Iterator<Item = &'a ConditionMetrics>) -> MetricSummary {
    let (mut sum, mut used, mut n) = ([0.0; 6], [0usize; 6], 0);
    for r in rows {
        n += 1;
        for k in 0..6 {
            if let Some(v) = r.values[k] {
                sum[k] += v;
                used[k] += 1;
            }
        }
    }
    MetricSummary {
        values: std::array::from_fn(|k| (used[k] > 0).then(|| sum[k] / used[k] as f64)),
        n_conditions: n,
        n_undefined: std::array::from_fn(|k| n - used[k]),
    }
}

/// Scores each condition against the control mean, then averages over all of them and per
/// subgroup (`subgroup`: condition → name, e.g. a split's map; conditions it lacks are in no
/// subgroup).
pub fn evaluate(
    control_mean: &[f64],
    conditions: &[ConditionInput],
    subgroup: &BTreeMap<String, String>,
    opts: &MetricOptions,
) -> Result<PerturbationMetrics> {
    let g = control_mean.len();
    if let Some(j) = control_mean.iter().position(|v| !v.is_finite()) {
        bail!("the control mean is not finite at gene {j}");
    }
    let mut seen = HashSet::new();
    let mut per_condition = Vec::with_capacity(conditions.len());
    for c in conditions {
        let name = c.condition;
        ensure!(seen.insert(name), "condition {name:?} is scored twice; give each condition once");
        for (what, v) in [("true mean", Some(c.truth)), ("prediction", c.pred)] {
            let Some(v) = v else { continue };
            ensure!(v.len() == g, "condition {name:?}: the {what} has {} genes but the control mean has {g}", v.len());
            if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                bail!("condition {name:?}: the {what} is {} at gene {j}; predictions and data must be finite", v[j]);
            }
        }
        for (what, list) in [("DE", c.de), ("non-dropout DE", c.de_non_dropout)] {
            if let Some(&j) = list.iter().find(|&&j| j >= g) {
                bail!("condition {name:?}: {what} gene index {j} is out of range for {g} genes");
            }
        }
        per_condition.push(ConditionMetrics {
            condition: name.to_string(),
            subgroup: subgroup.get(name).cloned(),
            values: score(c, control_mean, opts.n_de),
        });
    }
    let names: HashSet<&String> = per_condition.iter().filter_map(|r| r.subgroup.as_ref()).collect();
    let subgroups =
        names.into_iter().map(|s| (s.clone(), summarise(per_condition.iter().filter(|r| r.subgroup.as_ref() == Some(s))))).collect();
    Ok(PerturbationMetrics { overall: summarise(per_condition.iter()), subgroups, per_condition })
}

impl MetricSummary {
    pub fn get(&self, metric: &str) -> Option<f64> {
        METRICS.iter().position(|&m| m == metric).and_then(|k| self.values[k])
    }

    fn write_entries<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        for (k, name) in METRICS.iter().enumerate() {
            map.serialize_entry(name, &self.values[k])?;
        }
        map.serialize_entry("n_conditions", &self.n_conditions)?;
        let undefined: BTreeMap<&str, usize> = METRICS.iter().copied().zip(self.n_undefined).collect();
        map.serialize_entry("n_undefined", &undefined)
    }
}

impl Serialize for MetricSummary {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        self.write_entries(&mut map)?;
        map.end()
    }
}

/// `{pearson: …, …, n_conditions, n_undefined: {…}, subgroups: {name: {…}}}`; undefined = null.
impl Serialize for PerturbationMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        self.overall.write_entries(&mut map)?;
        map.serialize_entry("subgroups", &self.subgroups)?;
        map.end()
    }
}

impl Serialize for ConditionMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("condition", &self.condition)?;
        map.serialize_entry("subgroup", &self.subgroup)?;
        for (k, name) in METRICS.iter().enumerate() {
            map.serialize_entry(name, &self.values[k])?;
        }
        map.end()
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `condition,subgroup,<metrics>` with an empty cell where a value is undefined; written
/// atomically to `path`.
pub fn write_per_condition_csv(rows: &[ConditionMetrics], path: &Path) -> Result<()> {
    let mut text = format!("condition,subgroup,{}\n", METRICS.join(","));
    for r in rows {
        text.push_str(&csv_field(&r.condition));
        text.push(',');
        text.push_str(&csv_field(r.subgroup.as_deref().unwrap_or("")));
        for v in r.values {
            text.push(',');
            if let Some(v) = v {
                text.push_str(&v.to_string());
            }
        }
        text.push('\n');
    }
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) => (if d.as_os_str().is_empty() { Path::new(".") } else { d }, n),
        _ => bail!("{}: not a file path for the per-condition table", path.display()),
    };
    crate::write_atomic(dir, name, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_is_undefined_for_constant_vectors() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap() - 1.0).abs() < 1e-15);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-15);
        assert_eq!(pearson(&[1.0, 2.0, 3.0], &[0.0, 0.0, 0.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
    }

    #[test]
    fn skipped_and_undefined_conditions_are_counted_not_averaged() {
        let m = [1.0, 1.0, 1.0, 1.0];
        let t1 = [2.0, 1.0, 0.0, 4.0];
        let zero = [0.0; 4];
        let de = [0, 1, 2, 3];
        let conds = [
            ConditionInput { condition: "A+ctrl", truth: &t1, pred: Some(&t1), de: &de, de_non_dropout: &de },
            ConditionInput { condition: "B+ctrl", truth: &zero, pred: Some(&t1), de: &de, de_non_dropout: &de },
            ConditionInput { condition: "C+ctrl", truth: &t1, pred: Some(&m), de: &de, de_non_dropout: &de },
            ConditionInput { condition: "D+ctrl", truth: &t1, pred: None, de: &de, de_non_dropout: &de },
        ];
        let sub: BTreeMap<String, String> =
            [("A+ctrl", "unseen_single"), ("C+ctrl", "unseen_single")].into_iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let r = evaluate(&m, &conds, &sub, &MetricOptions::default()).unwrap();
        assert_eq!(r.overall.n_conditions, 4);
        assert!(r.overall.values.iter().all(|v| (v.unwrap() - 1.0).abs() < 1e-15), "{:?}", r.overall.values);
        assert_eq!(r.overall.n_undefined, [3; 6]);
        assert_eq!(r.subgroups["unseen_single"].n_conditions, 2);
        let json = serde_json::to_value(&r).unwrap();
        assert!((json["pearson"].as_f64().unwrap() - 1.0).abs() < 1e-15);
        assert_eq!(json["subgroups"]["unseen_single"]["n_undefined"]["pearson_delta"], 1);
        assert!(r.per_condition[2].values.iter().all(|v| v.is_none()), "a constant prediction is undefined");
    }
}
