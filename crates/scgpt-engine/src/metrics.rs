//! Embedding quality on a labelled set, for validation during pretraining: leave-one-out kNN
//! label accuracy and the average silhouette width of the labels (scib's `ASW_label`, i.e. the
//! mean silhouette over cells rescaled to [0, 1] by `(s + 1) / 2`, Euclidean distance).
//! O(n²·d): meant for a few thousand cells.

/// Leave-one-out kNN accuracy with cosine similarity; a vote tie goes to the label of the
/// nearest neighbour among the tied labels.
pub fn knn_accuracy(emb: &[Vec<f32>], labels: &[usize], k: usize) -> f64 {
    let n = emb.len();
    if n < 2 {
        return f64::NAN;
    }
    let norms: Vec<f64> = emb.iter().map(|e| e.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12)).collect();
    let n_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut correct = 0usize;
    let mut sims: Vec<(f64, usize)> = Vec::with_capacity(n);
    for i in 0..n {
        sims.clear();
        for j in 0..n {
            if j != i {
                let dot: f64 = emb[i].iter().zip(&emb[j]).map(|(&a, &b)| a as f64 * b as f64).sum();
                sims.push((dot / (norms[i] * norms[j]), j));
            }
        }
        // Larger similarity first; index breaks exact ties so the result is deterministic.
        sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut votes = vec![0usize; n_labels];
        for &(_, j) in sims.iter().take(k) {
            votes[labels[j]] += 1;
        }
        let best = *votes.iter().max().unwrap_or(&0);
        let predicted = sims.iter().take(k).map(|&(_, j)| labels[j]).find(|&l| votes[l] == best);
        if predicted == Some(labels[i]) {
            correct += 1;
        }
    }
    correct as f64 / n as f64
}

/// Mean silhouette width (Euclidean), rescaled `(s + 1) / 2`. Cells of singleton labels get
/// s = 0, as sklearn's `silhouette_samples`. NaN with fewer than two labels.
pub fn asw_label(emb: &[Vec<f32>], labels: &[usize]) -> f64 {
    let n = emb.len();
    let n_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut sizes = vec![0usize; n_labels];
    for &l in labels {
        sizes[l] += 1;
    }
    if sizes.iter().filter(|&&s| s > 0).count() < 2 {
        return f64::NAN;
    }
    let mut total = 0.0;
    let mut sums = vec![0f64; n_labels];
    for i in 0..n {
        sums.iter_mut().for_each(|s| *s = 0.0);
        for j in 0..n {
            if j != i {
                let d: f64 = emb[i].iter().zip(&emb[j]).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
                sums[labels[j]] += d;
            }
        }
        let own = labels[i];
        let s = if sizes[own] < 2 {
            0.0
        } else {
            let a = sums[own] / (sizes[own] - 1) as f64;
            let b = (0..n_labels).filter(|&l| l != own && sizes[l] > 0).map(|l| sums[l] / sizes[l] as f64).fold(f64::INFINITY, f64::min);
            if a.max(b) > 0.0 {
                (b - a) / a.max(b)
            } else {
                0.0
            }
        };
        total += s;
    }
    (total / n as f64 + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_clusters_score_high_and_mixed_ones_low() {
        // Two tight clusters far apart: kNN perfect, silhouette close to 1 (ASW close to 1).
        let mut emb = Vec::new();
        let mut labels = Vec::new();
        for i in 0..10 {
            let e = i as f32 * 0.01;
            emb.push(vec![1.0 + e, 0.0]);
            labels.push(0);
            emb.push(vec![0.0, 1.0 + e]);
            labels.push(1);
        }
        assert_eq!(knn_accuracy(&emb, &labels, 3), 1.0);
        assert!(asw_label(&emb, &labels) > 0.95);
        // Labels assigned alternately along a line: no structure, ASW near 0.5.
        let emb: Vec<Vec<f32>> = (0..40).map(|i| vec![i as f32, 1.0]).collect();
        let labels: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let asw = asw_label(&emb, &labels);
        assert!((0.45..0.55).contains(&asw), "{asw}");
    }

    #[test]
    fn silhouette_matches_a_hand_computed_case() {
        // Points 0, 1 (label 0) and 4 (label 1) on a line.
        // s(0): a = 1, b = 4 → 0.75; s(1): a = 1, b = 3 → 2/3; s(4): singleton → 0.
        let emb = vec![vec![0.0], vec![1.0], vec![4.0]];
        let labels = vec![0, 0, 1];
        let want = ((0.75 + 2.0 / 3.0 + 0.0) / 3.0 + 1.0) / 2.0;
        assert!((asw_label(&emb, &labels) - want).abs() < 1e-12);
    }
}
