//! `[preprocess]`: the original `Preprocessor`'s gene selection on a fine-tuning input, before
//! it is prepared: genes outside the model vocabulary dropped (the tutorials subset to
//! `id_in_vocab` first), `filter_gene_by_counts`, then `subset_hvg` with the original's flavour
//! rule (`seurat_v3` on integer counts, `cell_ranger` otherwise) per batch. The result is a
//! list of gene names that scgpt-prep keeps (`filter.genes`) and `best_model/` records, so
//! inference restricts new data to the same genes.

use std::path::Path;

use anyhow::{bail, Context};
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_data::vocab::GeneVocab;
use scgpt_eval::preprocess::{filter_genes_min_counts, highly_variable_genes, HvgFlavor, HvgOptions};
use scgpt_eval::{keep_columns, CsrMatrix};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

/// What the selection did; saved as `run.dir/data/genes.json` and in `best_model/scgpt.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GeneSelection {
    /// The genes kept, in the input's column order.
    pub genes: Vec<String>,
    pub filter_gene_by_counts: f64,
    pub hvg: usize,
    /// The flavour that ran (`auto` resolved), if HVGs were selected.
    pub hvg_flavor: Option<String>,
    /// The batch column the HVGs were selected per, if any.
    pub hvg_batch_col: Option<String>,
    /// Everything the selection depends on, as requested (the `[preprocess]` section, the input,
    /// its gene and batch columns, the vocabulary it was restricted to): a run reuses its saved
    /// selection only when this is unchanged.
    #[serde(default)]
    pub request: serde_json::Value,
}

/// What a selection depends on (see [`GeneSelection::request`]).
pub fn request(cfg: &TrainConfig) -> serde_json::Value {
    serde_json::json!({
        "preprocess": cfg.preprocess,
        "input": cfg.data.input,
        "gene_col": cfg.data.gene_col,
        "batch_col": cfg.data.batch_col,
        "init_from": cfg.model.init_from,
    })
}

pub const SELECTION_FILE: &str = "genes.json";

/// Runs the `[preprocess]` selection on the single `data.input` file. `vocab`: the model
/// vocabulary when fine-tuning a checkpoint (genes outside it are dropped first).
pub fn select_genes(cfg: &TrainConfig, vocab: Option<&GeneVocab>) -> anyhow::Result<GeneSelection> {
    let p = &cfg.preprocess;
    let [path] = cfg.data.input.as_slice() else {
        bail!(
            "[preprocess] selects genes on one input file, data.input has {}; concatenate the files first (e.g. anndata.concat)",
            cfg.data.input.len()
        );
    };
    let what = path.display().to_string();
    // The matrix scgpt-prep reads (raw/X when present, else X).
    let mut r = H5adReader::open(path, MatrixChoice::RawThenX).with_context(|| format!("{what}: [preprocess]"))?;
    let gene_col = (!cfg.data.gene_col.is_empty()).then_some(cfg.data.gene_col.as_str());
    let names = r.var_names(gene_col)?;
    let block = r.read_rows(0, r.n_obs())?;
    let all = CsrMatrix::new(&block.indptr, &block.indices, &block.data, names.len())?;
    if let Some((_, &v)) = block.indices.iter().zip(block.data.iter()).find(|(_, v)| !v.is_finite() || **v < 0.0) {
        bail!("{what}: the value {v} is not a count or a normalised expression (finite, >= 0); [preprocess] cannot select genes on it");
    }
    let in_vocab: Vec<bool> = names.iter().map(|n| vocab.is_none_or(|v| v.is_gene(n))).collect();
    let (x, mut kept) = keep_columns(&all, &in_vocab);
    let (x, kept_now) = if p.filter_gene_by_counts > 0.0 {
        let keep = filter_genes_min_counts(&x.csr()?, p.filter_gene_by_counts);
        keep_columns(&x.csr()?, &keep)
    } else {
        let n = x.n_cols;
        (x, (0..n).collect())
    };
    kept = kept_now.iter().map(|&k| kept[k]).collect();
    if kept.is_empty() {
        bail!("{what}: no gene is left after [preprocess] (vocabulary, filter_gene_by_counts = {})", p.filter_gene_by_counts);
    }
    let mut sel = GeneSelection {
        genes: Vec::new(),
        filter_gene_by_counts: p.filter_gene_by_counts,
        hvg: p.hvg,
        hvg_flavor: None,
        hvg_batch_col: None,
        request: request(cfg),
    };
    if p.hvg > 0 && p.hvg < kept.len() {
        let integer = x.data.iter().all(|v| v.fract() == 0.0);
        let flavor = match p.hvg_flavor.as_str() {
            "auto" if integer => HvgFlavor::SeuratV3,
            "auto" => HvgFlavor::CellRanger,
            other => other.parse::<HvgFlavor>().map_err(|e| anyhow::anyhow!("preprocess.hvg_flavor: {e}"))?,
        };
        let batch: Option<Vec<u32>> = if p.hvg_per_batch && !cfg.data.batch_col.is_empty() {
            let values = r
                .obs_column(&cfg.data.batch_col)
                .with_context(|| format!("{what}: data.batch_col = {:?} (HVGs per batch)", cfg.data.batch_col))?;
            // Categories in sorted order, as scanpy numbers them.
            let mut cats: Vec<&String> = values.iter().collect();
            cats.sort();
            cats.dedup();
            Some(values.iter().map(|v| cats.binary_search(&v).expect("a category") as u32).collect())
        } else {
            None
        };
        let mut opts = HvgOptions::new(p.hvg, flavor);
        opts.batch = batch.as_deref();
        let hvg = highly_variable_genes(&x.csr()?, &opts)
            .with_context(|| format!("{what}: preprocess.hvg = {} with flavor {}", p.hvg, flavor.as_str()))?;
        kept = hvg.selected.iter().map(|&j| kept[j]).collect();
        sel.hvg_flavor = Some(flavor.as_str().to_string());
        sel.hvg_batch_col = batch.is_some().then(|| cfg.data.batch_col.clone());
    }
    sel.genes = kept.iter().map(|&j| names[j].clone()).collect();
    Ok(sel)
}

/// Reads a run's saved selection, if it made one.
pub fn load(dir: &Path) -> anyhow::Result<Option<GeneSelection>> {
    let p = dir.join(SELECTION_FILE);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p)?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a gene selection", p.display()))?))
}
