//! Reference mapping by a k-nearest-neighbour vote under cosine distance (the scGPT paper's
//! reference mapping of embeddings). Brute force: query blocks against the whole reference
//! with a matrix product, blocks in parallel.

use anyhow::{bail, Result};
use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

/// Query rows per matrix product.
const BLOCK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct KnnVote {
    /// The winning reference label per query cell.
    pub labels: Vec<String>,
    /// Share of the k neighbours that voted for it.
    pub vote_fraction: Vec<f32>,
    /// The sorted reference labels: the columns of `fractions`.
    pub classes: Vec<String>,
    /// Row-major query cells × `classes`: each label's share of the k neighbours.
    pub fractions: Vec<f32>,
}

/// Rows scaled to unit length; all-zero rows stay zero (similarity 0 to everything).
fn unit_rows(x: ArrayView2<f32>) -> Array2<f32> {
    let mut out = x.to_owned();
    for mut r in out.axis_iter_mut(Axis(0)) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            r.mapv_inplace(|v| v / n);
        }
    }
    out
}

/// Majority label among the neighbours, given sorted nearest first. Ties go to the label whose
/// nearest neighbour comes first, i.e. is closest (then lowest reference index).
fn vote(neigh: &[usize], ref_labels: &[u32], n_labels: usize) -> (u32, Vec<usize>) {
    let mut counts = vec![0usize; n_labels];
    let mut first_seen = vec![usize::MAX; n_labels];
    for (rank, &r) in neigh.iter().enumerate() {
        let l = ref_labels[r] as usize;
        counts[l] += 1;
        first_seen[l] = first_seen[l].min(rank);
    }
    let best = (0..n_labels)
        .filter(|&l| counts[l] > 0)
        .max_by(|&a, &b| counts[a].cmp(&counts[b]).then(first_seen[b].cmp(&first_seen[a])))
        .unwrap_or(0);
    (best as u32, counts)
}

/// Labels the `query` rows (`dim` values each, row-major) by the majority of their `k` nearest
/// `reference` rows under cosine distance. `k` is capped at the reference size.
pub fn knn_vote(reference: &[f32], ref_labels: &[String], query: &[f32], dim: usize, k: usize) -> Result<KnnVote> {
    if dim == 0 || !reference.len().is_multiple_of(dim) || !query.len().is_multiple_of(dim) {
        bail!("kNN: embeddings of {} and {} values do not split into rows of {dim}", reference.len(), query.len());
    }
    let n_ref = reference.len() / dim;
    if n_ref != ref_labels.len() {
        bail!("kNN: {n_ref} reference rows but {} labels", ref_labels.len());
    }
    if n_ref == 0 || k == 0 {
        bail!("kNN needs a non-empty reference and k >= 1");
    }
    if reference.iter().chain(query).any(|v| !v.is_finite()) {
        bail!("kNN: the embeddings contain NaN or infinite values");
    }
    let k = k.min(n_ref);
    let mut names: Vec<String> = ref_labels.to_vec();
    names.sort();
    names.dedup();
    let codes: Vec<u32> = ref_labels.iter().map(|l| names.binary_search(l).unwrap_or(0) as u32).collect();

    let r = unit_rows(ArrayView2::from_shape((n_ref, dim), reference)?);
    let q = unit_rows(ArrayView2::from_shape((query.len() / dim, dim), query)?);
    let per_block: Vec<Vec<(u32, Vec<usize>)>> = q
        .axis_chunks_iter(Axis(0), BLOCK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|qb| {
            let sims = qb.dot(&r.t());
            sims.axis_iter(Axis(0))
                .map(|s| {
                    let mut order: Vec<usize> = (0..n_ref).collect();
                    // Largest similarity first; reference order breaks exact ties.
                    let cmp = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(a.cmp(b));
                    if k < n_ref {
                        order.select_nth_unstable_by(k - 1, cmp);
                        order.truncate(k);
                    }
                    order.sort_by(cmp);
                    vote(&order, &codes, names.len())
                })
                .collect()
        })
        .collect();
    let mut fractions = Vec::with_capacity(q.nrows() * names.len());
    let mut labels = Vec::with_capacity(q.nrows());
    let mut vote_fraction = Vec::with_capacity(q.nrows());
    for (l, counts) in per_block.into_iter().flatten() {
        labels.push(names[l as usize].clone());
        vote_fraction.push(counts[l as usize] as f32 / k as f32);
        fractions.extend(counts.iter().map(|&c| c as f32 / k as f32));
    }
    Ok(KnnVote { labels, vote_fraction, classes: names, fractions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn planted_clusters() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let dim = 16;
        let centre = |c: usize, j: usize| if j % 4 == c { 5.0f32 } else { 0.0 };
        let mut make = |n: usize| {
            let (mut x, mut y) = (vec![], vec![]);
            for i in 0..n {
                let c = i % 4;
                for j in 0..dim {
                    x.push(centre(c, j) + rng.random::<f32>() - 0.5);
                }
                y.push(format!("c{c}"));
            }
            (x, y)
        };
        let (rx, ry) = make(200);
        let (qx, qy) = make(50);
        let v = knn_vote(&rx, &ry, &qx, dim, 10).unwrap();
        assert_eq!(v.labels, qy);
        assert!(v.vote_fraction.iter().all(|&f| f == 1.0));
    }

    #[test]
    fn ties_go_to_the_closest_neighbour() {
        // Query (1, 0); neighbours: "b" at angle 0.1 and 0.4, "a" at 0.2 and 0.3; k = 4 ties
        // 2-2 and "b" holds the nearest.
        let at = |t: f32| [t.cos(), t.sin()];
        let rows = [at(0.2), at(0.1), at(0.3), at(0.4), at(3.0)];
        let reference: Vec<f32> = rows.iter().flatten().copied().collect();
        let labels: Vec<String> = ["a", "b", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let v = knn_vote(&reference, &labels, &[1.0, 0.0], 2, 4).unwrap();
        assert_eq!(v.labels, vec!["b"]);
        assert_eq!(v.vote_fraction, vec![0.5]);
        assert_eq!(v.classes, vec!["a", "b", "c"]);
        assert_eq!(v.fractions, vec![0.5, 0.5, 0.0]);
        // k larger than the reference is capped.
        let v = knn_vote(&reference, &labels, &[1.0, 0.0], 2, 50).unwrap();
        assert_eq!((v.labels[0].as_str(), v.vote_fraction[0]), ("b", 0.4));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let l = vec!["a".to_string()];
        assert!(knn_vote(&[1.0, 2.0], &l, &[1.0], 2, 1).is_err());
        assert!(knn_vote(&[1.0, 2.0], &[], &[1.0, 2.0], 2, 1).is_err());
        assert!(knn_vote(&[f32::NAN, 2.0], &l, &[1.0, 2.0], 2, 1).is_err());
    }
}
