//! The annotation baseline a user tries first, fit on a labelled reference and applied to a
//! query, as scanpy + scikit-learn would run it: `normalize_total(1e4)`, `log1p`,
//! `highly_variable_genes(n_top_genes=2000, flavor="seurat")` on the reference, centring by
//! the reference mean (no scaling), PCA to 50 and `LogisticRegression()` on the components.
//!
//! Each matrix is normalised over its own genes; the query is then matched to the reference's
//! highly variable genes by name (genes it lacks count as zero). Nothing in it is random: the
//! eigensolver is exact and L-BFGS starts from zero, so a rerun gives the same output.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::csr::CsrMatrix;
use crate::logreg::{argmax, LogRegOptions, LogisticRegression};
use crate::pca::Pca;
use crate::preprocess::{highly_variable_seurat, normalize_log1p};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineOptions {
    pub n_hvg: usize,
    pub n_pcs: usize,
    /// Mean bins of the Seurat dispersion rule.
    pub n_bins: usize,
    pub target_sum: f64,
    /// Inverse L2 strength of the logistic regression.
    pub c: f64,
    pub max_iter: usize,
    /// Recorded with the results; no step of the current pipeline draws random numbers.
    pub seed: u64,
}

impl Default for BaselineOptions {
    fn default() -> Self {
        BaselineOptions { n_hvg: 2000, n_pcs: 50, n_bins: 20, target_sum: 1e4, c: 1.0, max_iter: 1000, seed: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct BaselinePrediction {
    /// The training classes, sorted (the probability columns).
    pub classes: Vec<String>,
    /// One predicted class per query cell.
    pub labels: Vec<String>,
    /// Query cells × classes.
    pub probabilities: Array2<f64>,
    /// The highly variable genes used, in reference order.
    pub hvg: Vec<String>,
    /// Highly variable genes absent from the query (treated as zero there).
    pub hvg_missing_in_test: usize,
    pub n_pcs: usize,
    pub explained_variance: Vec<f64>,
    pub lr_iterations: usize,
    pub lr_converged: bool,
}

pub fn annotation_baseline(
    train: &CsrMatrix,
    train_genes: &[String],
    train_labels: &[String],
    test: &CsrMatrix,
    test_genes: &[String],
    opts: &BaselineOptions,
) -> Result<BaselinePrediction> {
    if train_genes.len() != train.n_cols() {
        bail!("reference: {} gene names for {} matrix columns", train_genes.len(), train.n_cols());
    }
    if test_genes.len() != test.n_cols() {
        bail!("query: {} gene names for {} matrix columns", test_genes.len(), test.n_cols());
    }
    if train_labels.len() != train.n_rows() {
        bail!("reference: {} labels for {} cells", train_labels.len(), train.n_rows());
    }
    let classes: Vec<String> = train_labels.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
    if classes.len() < 2 {
        bail!("the reference labels hold {} class(es); a classifier needs at least two", classes.len());
    }
    if opts.n_hvg == 0 || opts.n_pcs == 0 {
        bail!("n_hvg and n_pcs must be positive");
    }

    let train_log = normalize_log1p(train, opts.target_sum, "reference")?;
    let hvg_cols = highly_variable_seurat(&train_log, opts.n_hvg, opts.n_bins)?;
    let mut train_map = vec![None; train.n_cols()];
    for (f, &j) in hvg_cols.iter().enumerate() {
        train_map[j] = Some(f);
    }
    let hvg: Vec<String> = hvg_cols.iter().map(|&j| train_genes[j].clone()).collect();
    let pca = Pca::fit(&train_log, &train_map, hvg.len(), opts.n_pcs)?;
    let z_train = pca.transform(&train_log, &train_map);
    drop(train_log);

    let class_of: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let y: Vec<usize> = train_labels.iter().map(|l| class_of[l.as_str()]).collect();
    let lr_opts = LogRegOptions { c: opts.c, max_iter: opts.max_iter, ..Default::default() };
    let model = LogisticRegression::fit(z_train.view(), &y, classes.len(), &lr_opts)?;

    // The query's columns onto the HVG features by name; the first of duplicated names wins in
    // the reference, and duplicated query columns add up.
    let hvg_pos: HashMap<&str, usize> = hvg.iter().enumerate().rev().map(|(f, g)| (g.as_str(), f)).collect();
    let test_map: Vec<Option<usize>> = test_genes.iter().map(|g| hvg_pos.get(g.as_str()).copied()).collect();
    let present: BTreeSet<usize> = test_map.iter().flatten().copied().collect();
    let test_log = normalize_log1p(test, opts.target_sum, "query")?;
    let z_test = pca.transform(&test_log, &test_map);
    let probabilities = model.predict_proba(z_test.view());
    let labels = probabilities.rows().into_iter().map(|r| classes[argmax(r)].clone()).collect();

    Ok(BaselinePrediction {
        classes,
        labels,
        probabilities,
        hvg_missing_in_test: hvg.len() - present.len(),
        hvg,
        n_pcs: pca.n_components(),
        explained_variance: pca.explained_variance,
        lr_iterations: model.iterations,
        lr_converged: model.converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// indptr, indices, data, gene names, labels.
    type Planted = (Vec<usize>, Vec<u32>, Vec<f32>, Vec<String>, Vec<String>);

    /// Three cell types, each with its own 5 marker genes among 40; uniform noise counts.
    fn planted(n: usize, seed: u64, gene_order_rev: bool) -> Planted {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let g = 40;
        let (mut ip, mut ix, mut d, mut labels) = (vec![0], vec![], vec![], vec![]);
        for i in 0..n {
            let t = i % 3;
            for j in 0..g {
                let rate = if j / 5 == t { 20.0 } else { 2.0 };
                let v = (rng.random::<f64>() * 2.0 * rate).round() as f32;
                if v > 0.0 {
                    ix.push(if gene_order_rev { (g - 1 - j) as u32 } else { j as u32 });
                    d.push(v);
                }
            }
            ip.push(ix.len());
            labels.push(format!("type{t}"));
        }
        let genes = (0..g).map(|j| if gene_order_rev { format!("g{}", g - 1 - j) } else { format!("g{j}") }).collect();
        (ip, ix, d, genes, labels)
    }

    #[test]
    fn separates_planted_types_across_gene_orders() {
        let (ip, ix, d, genes, labels) = planted(90, 1, false);
        let train = CsrMatrix::new(&ip, &ix, &d, 40).unwrap();
        // The query lists its genes in reverse order: alignment is by name.
        let (tip, tix, td, tgenes, tlabels) = planted(30, 2, true);
        let test = CsrMatrix::new(&tip, &tix, &td, 40).unwrap();
        let opts = BaselineOptions { n_hvg: 20, n_pcs: 5, ..Default::default() };
        let p = annotation_baseline(&train, &genes, &labels, &test, &tgenes, &opts).unwrap();
        assert_eq!(p.classes, vec!["type0", "type1", "type2"]);
        assert_eq!(p.hvg.len(), 20);
        assert_eq!(p.n_pcs, 5);
        assert_eq!(p.labels, tlabels);
        assert!(p.lr_converged);
        let again = annotation_baseline(&train, &genes, &labels, &test, &tgenes, &opts).unwrap();
        assert_eq!(again.probabilities, p.probabilities);
    }

    #[test]
    fn one_class_is_an_error() {
        let (ip, ix, d, genes, _) = planted(6, 1, false);
        let x = CsrMatrix::new(&ip, &ix, &d, 40).unwrap();
        let same = vec!["a".to_string(); 6];
        assert!(annotation_baseline(&x, &genes, &same, &x, &genes, &BaselineOptions::default()).is_err());
    }
}
