//! Class labels of a classification head: the sorted labels of an obs column, kept in
//! `classes.json` beside the run and in `best_model/`, so class `i` means the same name in
//! training, resuming and `scgpt predict`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use scgpt_data::loader::ShardSet;

pub const CLASSES_FILE: &str = "classes.json";
/// The batch-label map (`data.batch_col`): label `i` is batch id `i`.
pub const BATCH_LABELS_FILE: &str = "batch_labels.json";

#[derive(Debug, Clone, PartialEq)]
pub struct Classes {
    pub names: Vec<String>,
    index: HashMap<String, i64>,
}

impl Classes {
    pub fn from_names(names: Vec<String>) -> Self {
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i as i64)).collect();
        Classes { names, index }
    }

    /// Every cell's label of `col` in every shard of every set, in storage order (`[set][shard]
    /// [row]`), and the sorted union of the labels.
    pub fn scan(sets: &[ShardSet], col: &str, key: &str) -> anyhow::Result<(Self, Vec<Vec<Vec<String>>>)> {
        let mut all = std::collections::BTreeSet::new();
        let mut per_set = Vec::new();
        for set in sets {
            let mut per_shard = Vec::new();
            for (path, _) in &set.shards {
                let values = scgpt_data::shard::read_obs_column(path, col).with_context(|| format!("{key} = {col:?}"))?;
                all.extend(values.iter().cloned());
                per_shard.push(values);
            }
            per_set.push(per_shard);
        }
        Ok((Self::from_names(all.into_iter().collect()), per_set))
    }

    /// `classes.json` of a run directory, if there is one.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        Self::load_file(&dir.join(CLASSES_FILE))
    }

    /// A saved label list, if the file exists.
    pub fn load_file(path: &Path) -> anyhow::Result<Option<Self>> {
        let path = path.to_path_buf();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let names: Vec<String> =
                    serde_json::from_str(&text).with_context(|| format!("{}: not a JSON list of labels", path.display()))?;
                Ok(Some(Self::from_names(names)))
            }
            Err(_) => Ok(None),
        }
    }

    /// As [`scan`](Self::scan), for a classifier: at least two labels.
    pub fn scan_classes(sets: &[ShardSet], col: &str, key: &str) -> anyhow::Result<(Self, Vec<Vec<Vec<String>>>)> {
        let (c, labels) = Self::scan(sets, col, key)?;
        anyhow::ensure!(c.len() >= 2, "{key} = {col:?}: {} distinct label(s) in the data; a classifier needs at least 2", c.len());
        Ok((c, labels))
    }

    pub fn to_json(&self) -> anyhow::Result<Vec<u8>> {
        Ok(serde_json::to_string_pretty(&self.names)?.into_bytes())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Class ids of labels; a label outside the run's classes is an error.
    pub fn ids(&self, labels: &[String], key: &str) -> anyhow::Result<Vec<i64>> {
        labels
            .iter()
            .map(|l| {
                self.index.get(l).copied().with_context(|| {
                    format!(
                        "{key}: label {l:?} is not one of the run's {} classes (classes.json); a resumed run must see the same label set",
                        self.names.len()
                    )
                })
            })
            .collect()
    }

    /// Cells per class of `labels`.
    pub fn counts<'a>(&self, labels: impl Iterator<Item = &'a String>) -> Vec<usize> {
        let mut c = vec![0usize; self.names.len()];
        for l in labels {
            if let Some(&i) = self.index.get(l) {
                c[i as usize] += 1;
            }
        }
        c
    }
}

/// scikit-learn's `class_weight="balanced"`: n / (k · n_c); a class without cells weighs 0.
pub fn balanced_weights(counts: &[usize]) -> Vec<f32> {
    let n: usize = counts.iter().sum();
    let k = counts.iter().filter(|c| **c > 0).count().max(1);
    counts.iter().map(|&c| if c == 0 { 0.0 } else { n as f32 / (k as f32 * c as f32) }).collect()
}

/// A validation split stratified by label: per class, a seeded shuffle of its cells and the
/// first round(fraction · n) held out, at least one when the class has 2 cells or more and at
/// least one cell left to train on. A class with fewer than 2 cells is reported and kept out
/// of validation. Returns the mask (`[set][shard][row]`) and the lines to report.
pub fn stratified_split(labels: &[Vec<Vec<String>>], fraction: f64, seed: u64) -> (Vec<Vec<Vec<bool>>>, Vec<String>) {
    use rand::seq::SliceRandom;
    let mut by_class: BTreeMap<&str, Vec<(usize, usize, usize)>> = BTreeMap::new();
    for (si, set) in labels.iter().enumerate() {
        for (shi, shard) in set.iter().enumerate() {
            for (row, l) in shard.iter().enumerate() {
                by_class.entry(l.as_str()).or_default().push((si, shi, row));
            }
        }
    }
    let mut mask: Vec<Vec<Vec<bool>>> = labels.iter().map(|s| s.iter().map(|sh| vec![false; sh.len()]).collect()).collect();
    let mut notes = Vec::new();
    for (k, (class, mut cells)) in by_class.into_iter().enumerate() {
        if cells.len() < 2 {
            notes.push(format!("class {class:?} has {} cell(s): kept out of the validation split", cells.len()));
            continue;
        }
        cells.shuffle(&mut scgpt_data::seed::rng_for(seed, scgpt_data::seed::hash_str("scgpt-train: stratified split"), k as u64));
        let held = ((cells.len() as f64 * fraction).round() as usize).clamp(usize::from(fraction > 0.0), cells.len() - 1);
        for &(si, shi, row) in &cells[..held] {
            mask[si][shi][row] = true;
        }
    }
    (mask, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_split_holds_out_each_class_in_proportion() {
        let shard: Vec<String> = (0..100)
            .map(|i| {
                if i < 80 {
                    "a"
                } else if i < 99 {
                    "b"
                } else {
                    "c"
                }
                .to_string()
            })
            .collect();
        let (mask, notes) = stratified_split(&[vec![shard.clone()]], 0.1, 3);
        let held = |c: &str| shard.iter().zip(&mask[0][0]).filter(|(l, m)| l.as_str() == c && **m).count();
        assert_eq!((held("a"), held("b"), held("c")), (8, 2, 0));
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("\"c\""));
        let (again, _) = stratified_split(&[vec![shard]], 0.1, 3);
        assert_eq!(mask, again, "seeded");
    }

    #[test]
    fn balanced_weights_match_scikit_learn() {
        // sklearn: n_samples / (n_classes * bincount) = 6 / (2 * [4, 2]).
        assert_eq!(balanced_weights(&[4, 2]), vec![0.75, 1.5]);
    }
}
