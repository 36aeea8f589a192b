//! Gene embeddings (one vector per gene name) and their cosine similarities, as scGPT's
//! `GeneEmbedding.compute_similarities` (scikit-learn's `cosine_similarity`) computes them: rows
//! scaled to unit length (a zero vector stays zero, so its cosine with anything is 0), then dot
//! products, here in f64.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ndarray::{linalg::general_mat_mul, ArrayView2};
use rayon::prelude::*;

use crate::atomic;

/// scGPT's tutorial keeps the 20 most similar genes per gene.
pub const DEFAULT_TOP_K: usize = 20;

/// Gene names with one `dim`-long vector each (row-major), checked once: names unique and not
/// empty, values finite.
#[derive(Debug, Clone)]
pub struct GeneEmbeddings {
    genes: Vec<String>,
    dim: usize,
    vectors: Vec<f32>,
    index: HashMap<String, usize>,
}

impl GeneEmbeddings {
    pub fn new(genes: Vec<String>, vectors: Vec<f32>, dim: usize) -> Result<Self> {
        if dim == 0 {
            bail!("gene embeddings: the vector length is 0");
        }
        if vectors.len() != genes.len() * dim {
            bail!("gene embeddings: {} genes of dimension {dim} need {} values, got {}", genes.len(), genes.len() * dim, vectors.len());
        }
        if let Some(p) = vectors.iter().position(|v| !v.is_finite()) {
            bail!(
                "gene embeddings: the vector of {} holds a NaN or infinite value (column {}); drop or fix that gene",
                genes[p / dim],
                p % dim
            );
        }
        let mut index = HashMap::with_capacity(genes.len());
        for (i, g) in genes.iter().enumerate() {
            if g.trim().is_empty() {
                bail!("gene embeddings: gene {i} has an empty name");
            }
            if let Some(first) = index.insert(g.clone(), i) {
                bail!("gene embeddings: gene {g} appears twice (rows {first} and {i}); gene names must be unique");
            }
        }
        Ok(GeneEmbeddings { genes, dim, vectors, index })
    }

    pub fn genes(&self) -> &[String] {
        &self.genes
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.genes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.genes.is_empty()
    }
    /// All vectors, row-major.
    pub fn vectors(&self) -> &[f32] {
        &self.vectors
    }
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
    /// The row of gene `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Unit-length rows in f64 (zero rows stay zero, as scikit-learn's `normalize`).
    pub fn unit_vectors(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.vectors.len());
        for r in self.vectors.chunks_exact(self.dim) {
            let norm = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            let s = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            out.extend(r.iter().map(|&v| v as f64 * s));
        }
        out
    }

    /// Cosine similarities of the genes `rows` with the genes `cols`, row-major
    /// `rows.len() × cols.len()`. Indices must be below `len()`.
    pub fn cosine_block(&self, rows: &[usize], cols: &[usize]) -> Result<Vec<f64>> {
        let n = self.len();
        if let Some(&bad) = rows.iter().chain(cols).find(|&&i| i >= n) {
            bail!("gene embeddings: gene index {bad} is out of range for {n} genes");
        }
        Ok(dot_block(&self.unit_vectors(), self.dim, rows, cols))
    }
}

/// Dot products of the rows `rows` with the rows `cols` of `unit` (row-major, `dim` per row).
fn dot_block(unit: &[f64], dim: usize, rows: &[usize], cols: &[usize]) -> Vec<f64> {
    let gather = |idx: &[usize]| -> Vec<f64> { idx.iter().flat_map(|&i| unit[i * dim..(i + 1) * dim].iter().copied()).collect() };
    let (a, b) = (gather(rows), gather(cols));
    let mut out = vec![0f64; rows.len() * cols.len()];
    if out.is_empty() {
        return out;
    }
    let av = ArrayView2::from_shape((rows.len(), dim), &a).expect("rows of dim");
    let bv = ArrayView2::from_shape((cols.len(), dim), &b).expect("rows of dim");
    let mut ov = ndarray::ArrayViewMut2::from_shape((rows.len(), cols.len()), &mut out).expect("rows × cols");
    general_mat_mul(1.0, &av, &bv.t(), 0.0, &mut ov);
    out
}

/// One edge of the similarity network: `target` is among the genes most similar to `source`.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub source: String,
    pub target: String,
    pub cosine: f64,
}

/// Rows per block of the all-pairs sweep.
const BLOCK: usize = 256;

/// For every gene, the `k` other genes with the highest cosine similarity (fewer when there are
/// fewer genes), most similar first; ties go to the gene listed first. No self edges (a gene is
/// never its own target, even where another gene has the same vector). Sources in gene order.
pub fn top_k_edges(emb: &GeneEmbeddings, k: usize) -> Result<Vec<Edge>> {
    if k == 0 {
        bail!("top-k edges: k must be at least 1");
    }
    let n = emb.len();
    let unit = emb.unit_vectors();
    let all: Vec<usize> = (0..n).collect();
    let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
    let blocks: Vec<Vec<Edge>> = starts
        .into_par_iter()
        .map(|r0| {
            let rows: Vec<usize> = (r0..(r0 + BLOCK).min(n)).collect();
            let sims = dot_block(&unit, emb.dim, &rows, &all);
            let mut edges = Vec::with_capacity(rows.len() * k.min(n));
            for (r, &i) in rows.iter().enumerate() {
                let row = &sims[r * n..(r + 1) * n];
                let mut order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
                let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
                if order.len() > k {
                    order.select_nth_unstable_by(k - 1, cmp);
                    order.truncate(k);
                }
                order.sort_by(cmp);
                edges.extend(order.into_iter().map(|j| Edge {
                    source: emb.genes[i].clone(),
                    target: emb.genes[j].clone(),
                    cosine: row[j],
                }));
            }
            edges
        })
        .collect();
    Ok(blocks.into_iter().flatten().collect())
}

/// The edges as TSV text: a header with the columns `source`, `target`, `cosine`, then one
/// edge per line.
pub fn edges_to_tsv(edges: &[Edge]) -> String {
    let mut s = String::from("source\ttarget\tcosine\n");
    for e in edges {
        s.push_str(&format!("{}\t{}\t{}\n", e.source, e.target, e.cosine));
    }
    s
}

/// Writes [`edges_to_tsv`] to `dir/name` atomically.
pub fn write_edges_tsv(dir: &Path, name: &str, edges: &[Edge]) -> Result<PathBuf> {
    atomic::write(dir, name, edges_to_tsv(edges).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emb() -> GeneEmbeddings {
        let genes = ["A", "B", "C", "D"].map(String::from).to_vec();
        GeneEmbeddings::new(genes, vec![1.0, 0.0, 2.0, 0.1, 0.0, 1.0, 0.0, 0.0], 2).unwrap()
    }

    #[test]
    fn cosine_and_top_k() {
        let e = emb();
        let c = e.cosine_block(&[0, 1, 3], &[0, 1, 2, 3]).unwrap();
        assert!((c[0] - 1.0).abs() < 1e-15 && c[2].abs() < 1e-15 && c[3] == 0.0);
        assert!((c[1] - 2.0 / (4.01f64).sqrt()).abs() < 1e-7);
        assert!(c[8..].iter().all(|&v| v == 0.0), "a zero vector has cosine 0");
        let edges = top_k_edges(&e, 2).unwrap();
        assert_eq!(edges.len(), 8);
        assert_eq!((edges[0].target.as_str(), edges[1].target.as_str()), ("B", "C"));
        // For A, C and D tie at cosine 0: the gene listed first (C) wins.
        assert!(edges.iter().all(|e| e.source != e.target));
        assert_eq!(top_k_edges(&e, 10).unwrap().len(), 12);
        assert!(top_k_edges(&e, 0).is_err());
        assert!(edges_to_tsv(&edges).starts_with("source\ttarget\tcosine\nA\tB\t"));
    }

    #[test]
    fn bad_embeddings_are_errors() {
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(GeneEmbeddings::new(g(&["A", "A"]), vec![1.0, 2.0], 1).is_err());
        assert!(GeneEmbeddings::new(g(&["A", ""]), vec![1.0, 2.0], 1).is_err());
        assert!(GeneEmbeddings::new(g(&["A", "B"]), vec![1.0, f32::NAN], 1).is_err());
        assert!(GeneEmbeddings::new(g(&["A", "B"]), vec![1.0], 1).is_err());
        assert!(GeneEmbeddings::new(g(&["A"]), vec![], 0).is_err());
        assert!(emb().cosine_block(&[4], &[0]).is_err());
    }
}
