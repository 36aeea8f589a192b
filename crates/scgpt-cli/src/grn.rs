//! `scgpt grn`: gene regulatory networks read off a model. Each method is a subcommand with its
//! own file: `grn embedding` (`grn_embedding.rs`, the original's `Tutorial_GRN`) and
//! `grn attention` (`grn_attention.rs`, the original's `Tutorial_Attention_GRN`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::{grn_attention, grn_embedding};

#[derive(Debug, clap::Subcommand)]
pub enum Grn {
    /// Gene programs from a model's gene embeddings (Tutorial_GRN): cosine top-k edges, Leiden
    /// programs, program activity per cell and per cell type; optional GMT enrichment and
    /// scoring against a reference network beside co-expression and random edges.
    Embedding(grn_embedding::GrnEmbeddingArgs),
    /// Targets of a perturbed gene from a model's attention (Tutorial_Attention_GRN): how much
    /// more (or less) strongly each gene attends to GENE in the cells where GENE is perturbed
    /// than in control cells, from rank-normalised raw attention scores of one layer. Writes
    /// targets.tsv, top_targets.png and summary.json into --output.
    Attention(grn_attention::GrnAttentionArgs),
}

pub fn run(command: &Grn) -> anyhow::Result<()> {
    match command {
        Grn::Embedding(args) => grn_embedding::run(args),
        Grn::Attention(args) => grn_attention::run(args),
    }
}

/// `--genes` of both commands: `hvg:N` or a file of gene symbols.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GeneChoice {
    Hvg(usize),
    File(PathBuf),
}

pub(crate) fn parse_genes(s: &str) -> anyhow::Result<GeneChoice> {
    if let Some(n) = s.strip_prefix("hvg:") {
        let n: usize = n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("--genes {s:?}: hvg:N needs a positive number of genes, e.g. hvg:1200"))?;
        return Ok(GeneChoice::Hvg(n));
    }
    let p = PathBuf::from(s);
    if !p.is_file() {
        bail!("--genes {s:?}: neither hvg:N nor an existing file of gene symbols (one per line)");
    }
    Ok(GeneChoice::File(p))
}

/// The symbols of a `--genes` file: the first word of each line, `#` starting a comment.
pub(crate) fn read_gene_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--genes {}: cannot read", path.display()))?;
    Ok(text.lines().filter_map(|l| l.split('#').next().and_then(|l| l.split_whitespace().next())).map(str::to_string).collect())
}
