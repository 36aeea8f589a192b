//! Gene programs from gene embeddings, as scGPT's `GeneEmbedding.get_adata` + `get_metagenes`
//! find them: scanpy's `neighbors` on the vectors (15 neighbours, euclidean, the gene itself
//! counted) with UMAP connectivities ([`crate::neighbors`]), then Leiden at resolution 40
//! ([`crate::leiden`]); a program is a cluster of at least `min_program_size` genes (5 in the
//! tutorial).
//!
//! Our Leiden draws from its own random stream, so cluster ids and, on ambiguous graphs, the
//! split of a few genes can differ from leidenalg's; the test holds the programs to the planted
//! clusters and to scanpy's partition (adjusted Rand index).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::atomic;
use crate::leiden::{leiden, LeidenOptions};
use crate::neighbors::{exact_knn, umap_connectivities, SCANPY_N_NEIGHBORS};

use super::embedding::GeneEmbeddings;
use super::gmt::GeneSet;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgramOptions {
    /// Neighbours per gene, the gene itself included (scanpy's `n_neighbors`, 15).
    pub n_neighbors: usize,
    /// Leiden resolution (scGPT's `get_adata(resolution=40)` in the tutorial).
    pub resolution: f64,
    /// Clusters with fewer genes are not programs (5 in the tutorial).
    pub min_program_size: usize,
    /// Seed of our Leiden's random stream.
    pub seed: u64,
}

impl Default for ProgramOptions {
    fn default() -> Self {
        ProgramOptions { n_neighbors: SCANPY_N_NEIGHBORS, resolution: 40.0, min_program_size: 5, seed: 0 }
    }
}

/// One program: a Leiden cluster and its genes (indices into the embedding, in embedding order,
/// as `get_metagenes` lists them).
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The Leiden cluster id (clusters are numbered by decreasing size, as leidenalg does).
    pub id: u32,
    pub genes: Vec<usize>,
}

impl Program {
    /// The program's name in tables: its cluster id, as scGPT names it (`"{id}_SCORE"`).
    pub fn name(&self) -> String {
        self.id.to_string()
    }
    pub fn gene_names(&self, emb: &GeneEmbeddings) -> Vec<String> {
        self.genes.iter().map(|&g| emb.genes()[g].clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenePrograms {
    /// Each gene's Leiden cluster.
    pub clusters: Vec<u32>,
    pub n_clusters: usize,
    /// Clusters of at least `min_program_size` genes, by id.
    pub programs: Vec<Program>,
}

/// Clusters the genes of `emb` and keeps the programs. Needs at least 2 genes.
pub fn gene_programs(emb: &GeneEmbeddings, opts: &ProgramOptions) -> Result<GenePrograms> {
    if !(opts.resolution.is_finite() && opts.resolution > 0.0) {
        bail!("gene programs: resolution = {} must be a positive number (the tutorial uses 40)", opts.resolution);
    }
    if opts.n_neighbors < 2 {
        bail!("gene programs: n_neighbors = {} must be at least 2 (the gene itself counts; scanpy's default is 15)", opts.n_neighbors);
    }
    if opts.min_program_size == 0 {
        bail!("gene programs: min_program_size must be at least 1 (the tutorial uses 5)");
    }
    if emb.len() < 2 {
        bail!("gene programs: {} gene(s) given; clustering needs at least 2", emb.len());
    }
    let knn = exact_knn(emb.vectors(), emb.dim(), opts.n_neighbors)?;
    let graph = umap_connectivities(&knn);
    let clusters = leiden(&graph, &LeidenOptions { resolution: opts.resolution, seed: opts.seed, n_iterations: None });
    let n_clusters = clusters.iter().map(|&c| c as usize + 1).max().unwrap_or(0);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_clusters];
    for (g, &c) in clusters.iter().enumerate() {
        members[c as usize].push(g);
    }
    let programs = members
        .into_iter()
        .enumerate()
        .filter(|(_, m)| m.len() >= opts.min_program_size)
        .map(|(id, genes)| Program { id: id as u32, genes })
        .collect();
    Ok(GenePrograms { clusters, n_clusters, programs })
}

impl GenePrograms {
    /// The programs as gene sets named by cluster id, described as scGPT labels them in its
    /// heatmap: the first 10 genes, then `*` when there are more.
    pub fn gene_sets(&self, emb: &GeneEmbeddings) -> Vec<GeneSet> {
        self.programs
            .iter()
            .map(|p| {
                let names = p.gene_names(emb);
                let mut description = names.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
                if names.len() > 10 {
                    description.push('*');
                }
                GeneSet::new(p.name(), description, names)
            })
            .collect()
    }

    /// The programs as TSV, one gene per line, columns `program` and `gene` (programs by id, genes in
    /// embedding order).
    pub fn to_tsv(&self, emb: &GeneEmbeddings) -> String {
        let mut s = String::from("program\tgene\n");
        for p in &self.programs {
            for &g in &p.genes {
                s.push_str(&format!("{}\t{}\n", p.id, emb.genes()[g]));
            }
        }
        s
    }

    /// Writes [`GenePrograms::to_tsv`] to `dir/name` atomically.
    pub fn write_tsv(&self, emb: &GeneEmbeddings, dir: &Path, name: &str) -> Result<PathBuf> {
        atomic::write(dir, name, self.to_tsv(emb).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_errors() {
        let e = GeneEmbeddings::new(vec!["A".into(), "B".into(), "C".into()], vec![0.0, 1.0, 5.0], 1).unwrap();
        for o in [
            ProgramOptions { resolution: 0.0, ..Default::default() },
            ProgramOptions { resolution: f64::NAN, ..Default::default() },
            ProgramOptions { n_neighbors: 1, ..Default::default() },
            ProgramOptions { min_program_size: 0, ..Default::default() },
        ] {
            assert!(gene_programs(&e, &o).is_err(), "{o:?}");
        }
        let one = GeneEmbeddings::new(vec!["A".into()], vec![0.0], 1).unwrap();
        assert!(gene_programs(&one, &ProgramOptions::default()).is_err());
        // Three genes: clusters, but none reaches 5 genes.
        let p = gene_programs(&e, &ProgramOptions::default()).unwrap();
        assert_eq!(p.clusters.len(), 3);
        assert!(p.programs.is_empty());
    }
}
