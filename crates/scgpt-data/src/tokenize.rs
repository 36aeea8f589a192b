//! One cell to model input, as the original's `embed_data` + `DataCollator` do it:
//!
//! 1. the cell's nonzero genes that are in the vocabulary, in input column order;
//! 2. their values binned per cell with 51 bins (the collator hard-codes 51 whatever args.json
//!    says) over those nonzero values: 1..50;
//! 3. if more than `max_seq_len - 1` genes remain, `max_seq_len - 1` of them are kept;
//! 4. `<cls>` first with value `pad_value` (−2 for every shipped checkpoint).
//!
//! Randomness. The original breaks binning ties with the global numpy RNG and subsamples with
//! `torch.randperm`, so its embeddings change from run to run. Here both come from per-cell
//! streams keyed by (seed, purpose, global cell index) — the same output for the same seed
//! whatever the batch size or thread count. In deterministic mode there is no randomness:
//! tied values take the lowest tied bin, and subsampling keeps the `max_seq_len - 1` genes with
//! the highest raw values (ties: the earlier input column wins), in input column order.

use crate::binning::{Binner, TieBreak, DEFAULT_N_BINS};
use crate::seed::{hash_str, rng_for};
use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct TokenizeOptions {
    pub max_seq_len: usize,
    pub cls_id: u32,
    pub pad_value: f32,
    /// `None`: deterministic mode.
    pub seed: Option<u64>,
}

/// A tokenized cell: `ids[0]` is `<cls>`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub values: Vec<f32>,
    /// Genes dropped by subsampling.
    pub dropped: usize,
}

/// Scratch buffers reused across cells.
#[derive(Default)]
pub struct Scratch {
    binner: Binner,
    bins: Vec<u8>,
    order: Vec<usize>,
}

fn stream_bins() -> u64 {
    hash_str("scgpt embed: binning ties")
}

fn stream_sample() -> u64 {
    hash_str("scgpt embed: subsampling")
}

/// `genes`/`values`: the cell's nonzero in-vocabulary genes in input order (values finite and
/// positive). `cell` is the global index of the cell in the input, the key of its RNG streams.
pub fn tokenize(cell: u64, genes: &[u32], values: &[f32], opt: &TokenizeOptions, s: &mut Scratch) -> Tokens {
    debug_assert_eq!(genes.len(), values.len());
    debug_assert!(opt.max_seq_len >= 2);
    let n = genes.len();
    match opt.seed {
        Some(seed) => {
            let mut rng = rng_for(seed, stream_bins(), cell);
            s.binner.bin_nonzero(values, DEFAULT_N_BINS, TieBreak::Random(&mut rng), &mut s.bins);
        }
        None => s.binner.bin_nonzero::<rand_chacha::ChaCha8Rng>(values, DEFAULT_N_BINS, TieBreak::Lowest, &mut s.bins),
    }
    let keep = (opt.max_seq_len - 1).min(n);
    s.order.clear();
    s.order.extend(0..n);
    if keep < n {
        match opt.seed {
            Some(seed) => {
                // torch.randperm(n)[:keep]: a uniform random subset in random order (partial
                // Fisher-Yates).
                let mut rng = rng_for(seed, stream_sample(), cell);
                for i in 0..keep {
                    let j = rng.random_range(i..n);
                    s.order.swap(i, j);
                }
                s.order.truncate(keep);
            }
            None => {
                s.order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
                s.order.truncate(keep);
                s.order.sort_unstable();
            }
        }
    }
    let mut t = Tokens { ids: Vec::with_capacity(keep + 1), values: Vec::with_capacity(keep + 1), dropped: n - keep };
    t.ids.push(opt.cls_id);
    t.values.push(opt.pad_value);
    for &i in &s.order {
        t.ids.push(genes[i]);
        t.values.push(s.bins[i] as f32);
    }
    t
}

/// A padded minibatch in the original's layout: `[B, L]` ids, values and key-padding mask
/// (true at `<pad>`), `L` = the longest cell of the batch.
pub struct Batch {
    pub b: usize,
    pub l: usize,
    pub ids: Vec<i64>,
    pub values: Vec<f32>,
    pub pad: Vec<bool>,
}

pub fn collate(cells: &[&Tokens], pad_id: u32, pad_value: f32) -> Batch {
    let b = cells.len();
    let l = cells.iter().map(|c| c.ids.len()).max().unwrap_or(1);
    let mut batch = Batch { b, l, ids: vec![pad_id as i64; b * l], values: vec![pad_value; b * l], pad: vec![true; b * l] };
    for (r, c) in cells.iter().enumerate() {
        let row = r * l;
        for (k, (&id, &v)) in c.ids.iter().zip(&c.values).enumerate() {
            batch.ids[row + k] = id as i64;
            batch.values[row + k] = v;
            batch.pad[row + k] = false;
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(max_seq_len: usize, seed: Option<u64>) -> TokenizeOptions {
        TokenizeOptions { max_seq_len, cls_id: 99, pad_value: -2.0, seed }
    }

    #[test]
    fn cls_first_with_pad_value_and_bins_after() {
        let genes = [5u32, 7, 9, 11];
        let values = [1.0f32, 4.0, 2.0, 8.0];
        let t = tokenize(0, &genes, &values, &opt(1200, None), &mut Scratch::default());
        assert_eq!(t.ids, vec![99, 5, 7, 9, 11]);
        assert_eq!(t.values[0], -2.0);
        assert_eq!(t.values[1], 1.0, "min gets bin 1");
        assert_eq!(t.values[4], 50.0, "max gets bin 50");
        assert_eq!(t.dropped, 0);
    }

    #[test]
    fn empty_cell_is_cls_alone() {
        let t = tokenize(3, &[], &[], &opt(1200, Some(1)), &mut Scratch::default());
        assert_eq!((t.ids, t.values), (vec![99], vec![-2.0]));
    }

    #[test]
    fn deterministic_subsampling_keeps_top_values_in_column_order() {
        let genes: Vec<u32> = (0..10).collect();
        let values = [3.0f32, 9.0, 1.0, 9.0, 2.0, 7.0, 9.0, 0.5, 8.0, 4.0];
        let t = tokenize(0, &genes, &values, &opt(5, None), &mut Scratch::default());
        // top 4 by value: 9 (cols 1, 3, 6; earlier wins on ties), then 8 (col 8)
        assert_eq!(t.ids, vec![99, 1, 3, 6, 8]);
        assert_eq!(t.dropped, 6);
        let again = tokenize(0, &genes, &values, &opt(5, None), &mut Scratch::default());
        assert_eq!(t, again);
    }

    #[test]
    fn random_subsampling_is_keyed_by_seed_and_cell() {
        let genes: Vec<u32> = (0..50).collect();
        let values: Vec<f32> = (0..50).map(|v| v as f32 + 1.0).collect();
        let mut s = Scratch::default();
        let a = tokenize(7, &genes, &values, &opt(11, Some(1)), &mut s);
        let b = tokenize(7, &genes, &values, &opt(11, Some(1)), &mut s);
        let c = tokenize(8, &genes, &values, &opt(11, Some(1)), &mut s);
        let d = tokenize(7, &genes, &values, &opt(11, Some(2)), &mut s);
        assert_eq!(a, b);
        assert_ne!(a.ids, c.ids);
        assert_ne!(a.ids, d.ids);
        assert_eq!(a.ids.len(), 11);
        let mut kept = a.ids[1..].to_vec();
        kept.sort();
        kept.dedup();
        assert_eq!(kept.len(), 10, "no gene twice");
        // A kept gene keeps the bin it had in the whole cell (binning before sampling).
        let full = tokenize(7, &genes, &values, &opt(1200, Some(1)), &mut s);
        for (id, v) in a.ids[1..].iter().zip(&a.values[1..]) {
            assert_eq!(*v, full.values[1 + *id as usize]);
        }
    }

    #[test]
    fn collate_pads_with_pad_id_and_value() {
        let a = Tokens { ids: vec![99, 1, 2], values: vec![-2.0, 1.0, 50.0], dropped: 0 };
        let b = Tokens { ids: vec![99], values: vec![-2.0], dropped: 0 };
        let batch = collate(&[&a, &b], 97, -2.0);
        assert_eq!((batch.b, batch.l), (2, 3));
        assert_eq!(batch.ids, vec![99, 1, 2, 99, 97, 97]);
        assert_eq!(batch.values, vec![-2.0, 1.0, 50.0, -2.0, -2.0, -2.0]);
        assert_eq!(batch.pad, vec![false, false, false, false, true, true]);
    }
}
