//! Attention-based GRN inference (the original's `Tutorial_Attention_GRN`): a read-only hook
//! that returns one layer's raw attention scores, and the tutorial's rank normalisation of them.
//!
//! **Scores** ([`TransformerModel::attention_scores`]). The tutorial replays the forward pass by
//! hand: `model.encoder(src) + model.value_encoder(values)`, then `model.bn` (the model it uses
//! carries a plain `bn`), then `transformer_encoder.layers[:l]` with the key padding mask, then
//! layer `l`'s `self_attn.Wqkv` split as `(B, L, 3, H, d/H)` into q, k, v, and returns
//! `q · kᵀ` per head: `[B, H, L, L]`, entry `[b, h, i, j]` = query `i` (row) against key `j`
//! (column). No `1/√dh` scaling, no softmax, no mask. The hook runs the model in evaluation
//! mode (`valid()`: running BatchNorm statistics, no dropout) whatever mode it was given, and
//! touches nothing of `forward`.
//!
//! **Rank normalisation** ([`rank_normalise`], [`rank_normalised_column`]). Per cell and head,
//! each row of the `M × M` scores is replaced by its ranks (argsort of argsort, 0..M−1) divided
//! by `M`; then each **column of that** is replaced by its ranks divided by `M`; the heads are
//! averaged. The tutorial then averages the cells of a condition. Ties: the tutorial's
//! `torch.argsort` is not stable, so tied values (rare among raw scores, common among the row
//! ranks a column holds) are ordered by the sort kernel; here ties are ordered by index (a
//! stable argsort), which is what `torch.argsort(..., stable=True)` gives.
//!
//! Differences from the tutorial, all deliberate: the number of heads is the model's (the
//! notebook hard-codes 8); the scores are f32 (the notebook runs under fp16 autocast); a model
//! without `bn` is used without it (the notebook calls `model.bn` unconditionally), and a DSBN
//! model normalises with the domain of each minibatch's first label as `_encode` does.

use burn::module::Module;
use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::model::{ModelInput, TransformerModel};

impl TransformerModel {
    /// Raw attention scores `q · kᵀ` of layer `layer` per head, `[B, H, L, L]` (query rows, key
    /// columns), computed as `Tutorial_Attention_GRN` does (module docs). A negative `layer`
    /// counts from the end (−1 = the last layer). `input.batch_labels` is read only by a DSBN
    /// model (which needs them); plain `bn` needs none, as the tutorial calls it directly.
    pub fn attention_scores(&self, input: ModelInput, layer: isize) -> Result<Tensor<4>> {
        let n = self.transformer_encoder.layers.len();
        let index = resolve_layer(layer, n)?;
        let ModelInput { src, values, src_key_padding_mask, batch_labels } = input;
        self.check_shapes(&src, Some(&values), Some(&src_key_padding_mask))?;
        let labels = if self.dsbn.is_some() {
            self.check_batch_labels(batch_labels.as_ref(), src.dims()[0])?;
            batch_labels
        } else {
            None
        };
        // Evaluation mode on the plain (non-autodiff) device: the running BatchNorm statistics
        // are read, never updated, and no dropout applies (`valid()` is PyTorch's `eval()`).
        let model = self.valid();
        let plain = |t: Tensor<2, Int>| t.inner();
        let (src, values, mask) = (plain(src), values.inner(), src_key_padding_mask.inner());
        let labels: Option<Tensor<1, Int>> = labels.map(|l| l.inner());
        let mut x = model.embed(src, Some(values), labels.as_ref())?.total_embs;
        for l in &model.transformer_encoder.layers[..index] {
            x = l.forward(x, Some(mask.clone()));
        }
        let attn = &model.transformer_encoder.layers[index].self_attn;
        let [q, k, _] = attn.split_heads(attn.Wqkv.forward(x));
        Ok(q.matmul(k.swap_dims(2, 3)))
    }
}

/// `layer` as an index into `n` layers; negative counts from the end, as Python does.
pub fn resolve_layer(layer: isize, n: usize) -> Result<usize> {
    let n_i = n as isize;
    let index = if layer < 0 { n_i + layer } else { layer };
    if index < 0 || index >= n_i {
        return Err(ModelError::input("layer", format!("{layer} is not a layer of this model: it has {n} (0..={} or -{n}..=-1)", n_i - 1)));
    }
    Ok(index as usize)
}

/// Stable ranks of `values` (0 = smallest; ties ordered by index), written to `rank`.
/// `order` is scratch.
fn stable_ranks(values: &[f32], order: &mut Vec<u32>, rank: &mut [u32]) {
    order.clear();
    order.extend(0..values.len() as u32);
    order.sort_by(|&a, &b| values[a as usize].total_cmp(&values[b as usize]));
    for (r, &i) in order.iter().enumerate() {
        rank[i as usize] = r as u32;
    }
}

/// Stable ranks of integer `values` in `0..m` by counting sort (ties ordered by index).
fn stable_int_ranks(values: &[u32], m: usize, counts: &mut Vec<u32>, rank: &mut [u32]) {
    counts.clear();
    counts.resize(m + 1, 0);
    for &v in values {
        counts[v as usize + 1] += 1;
    }
    for i in 1..=m {
        counts[i] += counts[i - 1];
    }
    for (i, &v) in values.iter().enumerate() {
        rank[i] = counts[v as usize];
        counts[v as usize] += 1;
    }
}

fn check_dims(scores: &[f32], heads: usize, m: usize) -> Result<()> {
    if heads == 0 || m == 0 || scores.len() != heads * m * m {
        return Err(ModelError::input("scores", format!("{} values are not {heads} heads × {m} × {m}", scores.len())));
    }
    Ok(())
}

/// The tutorial's rank normalisation of one cell: `scores` holds `heads` row-major `M × M`
/// matrices (query rows, key columns); returns the `M × M` mean over heads of
/// `colrank(rowrank(S) / M) / M` (module docs).
pub fn rank_normalise(scores: &[f32], heads: usize, m: usize) -> Result<Vec<f32>> {
    check_dims(scores, heads, m)?;
    let per_head: Vec<Vec<f32>> = scores
        .par_chunks(m * m)
        .map(|s| {
            let (mut order, mut counts) = (Vec::new(), Vec::new());
            let mut row_rank = vec![0u32; m * m];
            for i in 0..m {
                stable_ranks(&s[i * m..(i + 1) * m], &mut order, &mut row_rank[i * m..(i + 1) * m]);
            }
            let mut out = vec![0f32; m * m];
            let (mut col, mut col_rank) = (vec![0u32; m], vec![0u32; m]);
            for j in 0..m {
                for i in 0..m {
                    col[i] = row_rank[i * m + j];
                }
                stable_int_ranks(&col, m, &mut counts, &mut col_rank);
                for i in 0..m {
                    out[i * m + j] = col_rank[i] as f32 / m as f32;
                }
            }
            out
        })
        .collect();
    Ok(mean_of_heads(per_head, m * m))
}

/// Column `col` of [`rank_normalise`] (how every gene, as query, attends to the key `col`),
/// exactly, in O(H·M²) instead of O(H·M² log M): a column's ranks need only the rank of `col`
/// within each row, which is a count.
pub fn rank_normalised_column(scores: &[f32], heads: usize, m: usize, col: usize) -> Result<Vec<f32>> {
    check_dims(scores, heads, m)?;
    if col >= m {
        return Err(ModelError::input("col", format!("{col} >= sequence length {m}")));
    }
    let per_head: Vec<Vec<f32>> = scores
        .par_chunks(m * m)
        .map(|s| {
            // Rank of `col` within each row under the stable order: smaller values, plus equal
            // values at a smaller index.
            let ranks_of_col: Vec<u32> = (0..m)
                .map(|i| {
                    let row = &s[i * m..(i + 1) * m];
                    let x = row[col];
                    let mut r = 0u32;
                    for (j, &v) in row.iter().enumerate() {
                        let less = match v.total_cmp(&x) {
                            std::cmp::Ordering::Less => true,
                            std::cmp::Ordering::Equal => j < col,
                            std::cmp::Ordering::Greater => false,
                        };
                        r += less as u32;
                    }
                    r
                })
                .collect();
            let (mut counts, mut col_rank) = (Vec::new(), vec![0u32; m]);
            stable_int_ranks(&ranks_of_col, m, &mut counts, &mut col_rank);
            col_rank.iter().map(|&r| r as f32 / m as f32).collect()
        })
        .collect();
    Ok(mean_of_heads(per_head, m))
}

/// The mean over heads, summed in head order (PyTorch's `mean(1)` over a handful of values).
fn mean_of_heads(per_head: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let h = per_head.len() as f32;
    let mut sum = vec![0f32; len];
    for p in &per_head {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum.iter_mut().for_each(|s| *s /= h);
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize, levels: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % levels) as f32 - (levels / 2) as f32
            })
            .collect()
    }

    #[test]
    fn column_shortcut_equals_the_full_normalisation_with_ties() {
        // Few levels: many ties in rows, and therefore in columns.
        for (levels, m, h) in [(5u64, 7usize, 3usize), (1000, 12, 2), (2, 9, 1)] {
            let s = lcg(levels * 31 + m as u64, h * m * m, levels);
            let full = rank_normalise(&s, h, m).unwrap();
            for col in 0..m {
                let c = rank_normalised_column(&s, h, m, col).unwrap();
                for i in 0..m {
                    assert_eq!(c[i], full[i * m + col], "levels {levels} m {m} col {col} row {i}");
                }
            }
        }
    }

    #[test]
    fn rows_then_columns_by_hand() {
        // One head, M = 3. Row ranks: [2,0,1], [0,1,2], [1,2,0] (the tie in row 3 goes to
        // the lower index). Column 0 holds ranks (2,0,1) → (2,0,1); column 1 holds (0,1,2) →
        // (0,1,2); column 2 holds (1,2,0) → (1,2,0).
        let s = [3.0, 1.0, 2.0, -1.0, 0.0, 5.0, 4.0, 4.0, -2.0];
        let got = rank_normalise(&s, 1, 3).unwrap();
        let want: Vec<f32> = [2, 0, 1, 0, 1, 2, 1, 2, 0].iter().map(|&r| r as f32 / 3.0).collect();
        assert_eq!(got, want);
        // A column with tied row ranks: rows 0 and 1 both rank column 0 last.
        let s = [9.0, 1.0, 8.0, 2.0];
        // Row ranks [1,0], [1,0]; column 0 = (1,1) → ranks (0,1); column 1 = (0,0) → (0,1).
        assert_eq!(rank_normalise(&s, 1, 2).unwrap(), vec![0.0, 0.0, 0.5, 0.5]);
    }

    #[test]
    fn layer_indices_count_from_the_end_when_negative() {
        assert_eq!(resolve_layer(-1, 12).unwrap(), 11);
        assert_eq!(resolve_layer(0, 12).unwrap(), 0);
        assert_eq!(resolve_layer(-12, 12).unwrap(), 0);
        assert!(resolve_layer(12, 12).unwrap_err().to_string().contains("it has 12"));
        assert!(resolve_layer(-13, 12).is_err());
    }
}
