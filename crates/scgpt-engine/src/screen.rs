//! A perturbation screen read whole, as GEARS keeps it (`perturb_processed.h5ad`): one obs
//! column of conditions (`ctrl`, `GENE+ctrl`, `GENE1+GENE2`), gene symbols in a var column
//! (`gene_name`), log-normalised `X`. Screens are small (GEARS's largest, Norman, is 91k cells
//! × 5k genes, sparse), so training preparation, `predict-perturbation` and
//! `eval perturbation` all hold one in memory as CSR.
//!
//! `X` must be log-normalised: integer values everywhere (counts) or values above 30 (log1p of
//! 1e4-normalised data stays below ~10) are refused with the fix, unless `normalize` asks for
//! GEARS's own preprocessing (total 1e4 per cell, then log1p).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_eval::perturbation::{Condition, ConditionFormat};
use scgpt_eval::OwnedCsr;
use serde::{Deserialize, Serialize};

/// How a screen's file is read; `[data]` keys of a perturbation run, flags of the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenOptions {
    pub condition_col: String,
    pub control: String,
    pub separator: String,
    /// var column with gene symbols; empty = the var index.
    pub gene_col: String,
    pub normalize: bool,
}

impl ScreenOptions {
    pub fn from_config(cfg: &crate::config::TrainConfig) -> Self {
        let d = &cfg.data;
        ScreenOptions {
            condition_col: d.condition_col.clone(),
            control: d.control.clone(),
            separator: d.separator.clone(),
            gene_col: d.gene_col.clone(),
            normalize: d.normalize,
        }
    }
}

/// The largest value log-normalised data plausibly hold (log1p(1e4) ≈ 9.2).
pub const LOG_NORMALISED_MAX: f32 = 30.0;

pub struct Screen {
    pub path: PathBuf,
    /// Gene symbols, in the matrix's column order.
    pub genes: Vec<String>,
    /// The var index (GEARS's DE lists name genes by it).
    pub var_index: Vec<String>,
    /// Each cell's condition, as written in the file.
    pub conditions: Vec<String>,
    /// `obs["condition_name"]` when present (GEARS keys its DE lists by it).
    pub condition_names: Option<Vec<String>>,
    /// Log-normalised expression, cells × genes.
    pub x: OwnedCsr,
    pub opts: ScreenOptions,
    /// What reading did to the data (normalisation), for reports.
    pub notes: Vec<String>,
}

impl Screen {
    pub fn read(path: &Path, opts: &ScreenOptions) -> anyhow::Result<Screen> {
        anyhow::ensure!(path.is_file(), "{}: screen h5ad not found", path.display());
        let mut r = H5adReader::open(path, MatrixChoice::X)?;
        let gene_col = (!opts.gene_col.is_empty()).then_some(opts.gene_col.as_str());
        let genes = r.var_names(gene_col)?;
        let var_index = r.var_names(None)?;
        let conditions = r.obs_column(&opts.condition_col).with_context(|| {
            format!("{}: the condition column (data.condition_col / --condition-col = {:?})", path.display(), opts.condition_col)
        })?;
        let condition_names = r.obs_column("condition_name").ok();
        let n = r.n_obs();
        let mut x = OwnedCsr { indptr: vec![0], n_cols: r.n_vars(), ..Default::default() };
        let block = 8192;
        let mut start = 0;
        while start < n {
            let b = r.read_rows(start, (start + block).min(n))?;
            for i in 0..b.n_rows() {
                let (idx, val) = b.row(i);
                x.indices.extend_from_slice(idx);
                x.data.extend_from_slice(val);
                x.indptr.push(x.indices.len());
            }
            start += block;
        }
        let mut notes = Vec::new();
        if opts.normalize {
            normalize_log1p(&mut x);
            notes.push(format!("{}: normalised to 1e4 per cell and log1p'd (data.normalize)", path.display()));
        } else {
            check_log_normalised(&x, path)?;
        }
        let mut seen = std::collections::HashSet::new();
        let dups: Vec<&String> = genes.iter().filter(|g| !g.is_empty() && !seen.insert(g.as_str())).take(5).collect();
        if !dups.is_empty() {
            bail!(
                "{}: gene names repeat in {} ({}); a perturbed gene must name one column: make them unique or choose another gene column (data.gene_col / --gene-col)",
                path.display(),
                if opts.gene_col.is_empty() { "the var index".to_string() } else { format!("var[{:?}]", opts.gene_col) },
                dups.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        let screen = Screen { path: path.to_path_buf(), genes, var_index, conditions, condition_names, x, opts: opts.clone(), notes };
        if screen.control_rows().is_empty() {
            bail!(
                "{}: no control cells: no cell has {} = {:?} (data.control / --control names the control condition)",
                path.display(),
                opts.condition_col,
                opts.control
            );
        }
        Ok(screen)
    }

    pub fn n_cells(&self) -> usize {
        self.conditions.len()
    }

    pub fn n_genes(&self) -> usize {
        self.genes.len()
    }

    pub fn parse(&self, condition: &str) -> anyhow::Result<Condition> {
        self.format().parse(condition).with_context(|| format!("{}: obs[{:?}]", self.path.display(), self.opts.condition_col))
    }

    pub fn format(&self) -> ConditionFormat {
        ConditionFormat { control: self.opts.control.clone(), separator: self.opts.separator.clone() }
    }

    /// Rows of each condition (the control's included), in file order.
    pub fn rows_by_condition(&self) -> BTreeMap<String, Vec<usize>> {
        let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, c) in self.conditions.iter().enumerate() {
            m.entry(c.clone()).or_default().push(i);
        }
        m
    }

    pub fn control_rows(&self) -> Vec<usize> {
        self.conditions.iter().enumerate().filter(|(_, c)| **c == self.opts.control).map(|(i, _)| i).collect()
    }

    /// Column of each gene symbol.
    pub fn gene_index(&self) -> std::collections::HashMap<&str, usize> {
        self.genes.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect()
    }

    /// Row `i` written densely into `out` (length = genes).
    pub fn dense_row(&self, i: usize, out: &mut [f32]) {
        out.fill(0.0);
        let (a, b) = (self.x.indptr[i], self.x.indptr[i + 1]);
        for (&j, &v) in self.x.indices[a..b].iter().zip(&self.x.data[a..b]) {
            out[j as usize] = v;
        }
    }

    /// The mean expression of `rows`.
    pub fn mean_of(&self, rows: &[usize]) -> Vec<f64> {
        let mut m = vec![0f64; self.n_genes()];
        for &i in rows {
            let (a, b) = (self.x.indptr[i], self.x.indptr[i + 1]);
            for (&j, &v) in self.x.indices[a..b].iter().zip(&self.x.data[a..b]) {
                m[j as usize] += v as f64;
            }
        }
        let n = rows.len().max(1) as f64;
        m.iter_mut().for_each(|v| *v /= n);
        m
    }
}

/// GEARS's preprocessing of counts: each cell to a total of 1e4, then log1p.
pub fn normalize_log1p(x: &mut OwnedCsr) {
    for i in 0..x.indptr.len() - 1 {
        let row = &mut x.data[x.indptr[i]..x.indptr[i + 1]];
        let total: f64 = row.iter().map(|&v| v as f64).sum();
        if total > 0.0 {
            let s = 1e4 / total;
            row.iter_mut().for_each(|v| *v = ((*v as f64) * s).ln_1p() as f32);
        }
    }
}

/// Refuses counts and values too large for log-normalised data, saying which it saw.
pub fn check_log_normalised(x: &OwnedCsr, path: &Path) -> anyhow::Result<()> {
    let max = x.data.iter().fold(0f32, |m, &v| m.max(v));
    if let Some(bad) = x.data.iter().find(|v| !v.is_finite() || **v < 0.0) {
        bail!("{}: X holds {bad}; log-normalised expression is finite and >= 0", path.display());
    }
    let integers = !x.data.is_empty() && x.data.iter().all(|v| v.fract() == 0.0);
    if integers && max > 1.0 {
        bail!(
            "{}: X is not log-normalised: every value is an integer (counts?); set data.normalize = true (--normalize) to normalise to 1e4 per cell and log1p as GEARS does",
            path.display()
        );
    }
    if max > LOG_NORMALISED_MAX {
        bail!(
            "{}: X is not log-normalised: its maximum is {max} (log1p of 1e4-normalised data stays below ~10); set data.normalize = true (--normalize) to normalise counts as GEARS does",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(rows: &[&[f32]]) -> OwnedCsr {
        let mut x = OwnedCsr { indptr: vec![0], n_cols: rows[0].len(), ..Default::default() };
        for r in rows {
            for (j, &v) in r.iter().enumerate() {
                if v != 0.0 {
                    x.indices.push(j as u32);
                    x.data.push(v);
                }
            }
            x.indptr.push(x.indices.len());
        }
        x
    }

    #[test]
    fn counts_and_large_values_are_refused_with_the_reason() {
        let p = Path::new("s.h5ad");
        let e = check_log_normalised(&csr(&[&[3.0, 0.0, 12.0]]), p).unwrap_err().to_string();
        assert!(e.contains("integer") && e.contains("data.normalize"), "{e}");
        let e = check_log_normalised(&csr(&[&[3.5, 0.0, 120.0]]), p).unwrap_err().to_string();
        assert!(e.contains("maximum is 120"), "{e}");
        check_log_normalised(&csr(&[&[0.5, 0.0, 2.25]]), p).unwrap();
    }

    #[test]
    fn normalisation_is_total_1e4_then_log1p() {
        let mut x = csr(&[&[1.0, 3.0, 0.0]]);
        normalize_log1p(&mut x);
        assert!((x.data[0] - (2500f32).ln_1p()).abs() < 1e-5);
        assert!((x.data[1] - (7500f32).ln_1p()).abs() < 1e-5);
    }
}
