//! `scgpt grn`: gene regulatory networks read off a model. Each method is a subcommand with its
//! own file: `grn embedding` (`grn_embedding.rs`, the original's `Tutorial_GRN`) and
//! `grn attention` (`grn_attention.rs`, the original's `Tutorial_Attention_GRN`).

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
