//! `scgpt-prep inspect <dir>`: what a shard set holds.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use scgpt_data::shard::read_shard;
use scgpt_data::vocab::GeneVocab;

use crate::pipeline::{MANIFEST, VOCAB_FILE};

#[derive(Debug, Default, serde::Serialize)]
pub struct Inspection {
    pub shards: usize,
    pub cells: usize,
    pub genes_per_cell_min: usize,
    pub genes_per_cell_median: usize,
    pub genes_per_cell_max: usize,
    pub vocab_tokens: usize,
    /// Distinct vocabulary genes seen in at least one cell.
    pub vocab_genes_seen: usize,
    pub datasets: BTreeMap<String, usize>,
    pub labels: BTreeMap<String, BTreeMap<String, usize>>,
}

pub fn inspect(dir: &Path) -> anyhow::Result<Inspection> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("{}: no manifest; is this an scgpt-prep output directory?", manifest_path.display()))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", manifest_path.display()))?;
    let vocab = GeneVocab::from_file(&dir.join(VOCAB_FILE))?;
    let shard_files: Vec<String> = manifest["shards"]
        .as_array()
        .with_context(|| format!("{}: field `shards` missing", manifest_path.display()))?
        .iter()
        .filter_map(|s| s["file"].as_str().map(str::to_string))
        .collect();
    let mut out = Inspection { shards: shard_files.len(), vocab_tokens: vocab.len(), ..Default::default() };
    let mut lengths = Vec::new();
    let mut seen = vec![false; vocab.len()];
    for f in &shard_files {
        let (obs_names, cells) = read_shard(&dir.join(f))?;
        for i in 0..cells.len() {
            let (genes, _, _) = cells.cell(i);
            lengths.push(genes.len());
            for &g in genes {
                if let Some(s) = seen.get_mut(g as usize) {
                    *s = true;
                }
            }
        }
        for d in &cells.datasets {
            *out.datasets.entry(d.clone()).or_default() += 1;
        }
        for (name, col) in obs_names.iter().zip(&cells.obs) {
            let counts = out.labels.entry(name.clone()).or_default();
            for v in col {
                *counts.entry(v.clone()).or_default() += 1;
            }
        }
    }
    lengths.sort_unstable();
    out.cells = lengths.len();
    if !lengths.is_empty() {
        out.genes_per_cell_min = lengths[0];
        out.genes_per_cell_median = lengths[lengths.len() / 2];
        out.genes_per_cell_max = *lengths.last().expect("non-empty");
    }
    out.vocab_genes_seen = seen.iter().filter(|s| **s).count();
    Ok(out)
}

pub fn print(dir: &Path, i: &Inspection) {
    println!("{}: {} cells in {} shard(s)", dir.display(), i.cells, i.shards);
    println!("genes per cell: min {} / median {} / max {}", i.genes_per_cell_min, i.genes_per_cell_median, i.genes_per_cell_max);
    println!(
        "vocabulary: {} tokens, {} genes seen in the data ({:.1}% coverage)",
        i.vocab_tokens,
        i.vocab_genes_seen,
        100.0 * i.vocab_genes_seen as f64 / i.vocab_tokens.max(1) as f64
    );
    println!("datasets:");
    for (d, n) in &i.datasets {
        println!("  {d}: {n}");
    }
    for (col, counts) in &i.labels {
        println!("label `{col}` ({} values):", counts.len());
        let mut v: Vec<_> = counts.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (label, n) in v.iter().take(25) {
            println!("  {label}: {n}");
        }
        if v.len() > 25 {
            println!("  ... {} more", v.len() - 25);
        }
    }
}
