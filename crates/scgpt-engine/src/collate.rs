//! Cells to training minibatches, as the original's collators do it.
//!
//! Generative (`DataCollator._call_both` on `dev-temp`, spec §2.1): each cell's nonzero genes
//! are binned (51 bins, 1..50); a share `r` drawn once per batch from `gen_ratios` decides how
//! many of a cell's genes are generated: the genes are permuted, the first `⌊n·r⌋` become gen
//! tokens (value hidden, bin kept as target) and the rest follow `<cls>` as pcpt tokens. With
//! `L = min(max_seq_len, longest cell + 1)`, gen parts are cut or padded to `⌊(L−1)·r⌋` and pcpt
//! parts to `L − ⌊(L−1)·r⌋` (subsampling keeps `<cls>`; taking a prefix of a uniform permutation
//! is the original's `randperm` subsample).
//!
//! MLM (`training_tasks="pcpt"`, spec §2.5): `<cls>` + genes (subsampled to `max_seq_len`),
//! each non-pad, non-cls position masked with probability `mask_ratio` to `mask_value`; the
//! loss runs on masked positions.
//!
//! Randomness is per cell, keyed by (seed, epoch, the cell's index in the epoch order), and the
//! gen share per optimiser step, so a batch split across ranks or micro-batches is collated
//! exactly as the whole batch would be.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use scgpt_data::binning::{Binner, TieBreak, DEFAULT_N_BINS};
use scgpt_data::seed::{hash_str, rng_for};

/// A cell in the model's vocabulary (no `<cls>`): nonzero genes and their raw values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cell {
    pub genes: Vec<u32>,
    pub values: Vec<f32>,
    /// Key of the cell's random streams (epoch order index, or storage index for validation).
    pub key: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct CollateOptions {
    pub max_seq_len: usize,
    pub cls_id: u32,
    pub pad_id: u32,
    pub pad_value: f32,
    pub mask_value: f32,
    /// `None`: binning ties take the lowest bin.
    pub seed: Option<u64>,
    /// Seed of the structural draws (permutations, masks), always present.
    pub draw_seed: u64,
    pub epoch: u64,
}

/// `[B, P]` pcpt and `[B, G]` gen tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerativeBatch {
    pub batch: usize,
    pub pcpt_len: usize,
    pub gen_len: usize,
    pub gen_ratio: f64,
    pub pcpt_genes: Vec<i64>,
    pub pcpt_values: Vec<f32>,
    pub pcpt_pad: Vec<bool>,
    pub gen_genes: Vec<i64>,
    pub gen_target: Vec<f32>,
    pub gen_pad: Vec<bool>,
}

impl GenerativeBatch {
    /// Gen tokens that carry a target (the loss denominator).
    pub fn gen_tokens(&self) -> usize {
        self.gen_pad.iter().filter(|p| !**p).count()
    }
}

/// `[B, L]` tokens with the masked input values and the targets.
#[derive(Debug, Clone, PartialEq)]
pub struct MlmBatch {
    pub batch: usize,
    pub len: usize,
    pub genes: Vec<i64>,
    pub values: Vec<f32>,
    pub target: Vec<f32>,
    pub pad: Vec<bool>,
    pub masked: Vec<bool>,
    /// Class ids of the cells for a CLS objective (empty = no CLS term); set by the trainer.
    pub labels: Vec<i64>,
}

impl MlmBatch {
    /// `b` rows of `len` padding tokens, nothing masked.
    fn padded(b: usize, len: usize, opt: &CollateOptions) -> Self {
        MlmBatch {
            batch: b,
            len,
            genes: vec![opt.pad_id as i64; b * len],
            values: vec![opt.pad_value; b * len],
            target: vec![opt.pad_value; b * len],
            pad: vec![true; b * len],
            masked: vec![false; b * len],
            labels: Vec::new(),
        }
    }

    pub fn masked_tokens(&self) -> usize {
        self.masked.iter().filter(|m| **m).count()
    }
}

fn stream(name: &str) -> u64 {
    hash_str(name)
}

/// The per-step gen share: the same on every rank and micro-batch of one optimiser step.
pub fn gen_ratio_for(seed: u64, step: u64, ratios: &[f64]) -> f64 {
    let mut rng = rng_for(seed, stream("scgpt-train: gen ratio"), step);
    ratios[rng.random_range(0..ratios.len())]
}

fn cell_rng(opt: &CollateOptions, purpose: &str, key: u64) -> ChaCha8Rng {
    rng_for(opt.draw_seed ^ opt.epoch.wrapping_mul(0x9E37_79B9), stream(purpose), key)
}

fn bin_cell(cell: &Cell, opt: &CollateOptions, binner: &mut Binner, out: &mut Vec<u8>) {
    match opt.seed {
        Some(seed) => {
            let mut rng = rng_for(seed ^ opt.epoch.wrapping_mul(0x85EB_CA6B), stream("scgpt-train: binning ties"), cell.key);
            binner.bin_nonzero(&cell.values, DEFAULT_N_BINS, TieBreak::Random(&mut rng), out)
        }
        None => binner.bin_nonzero::<ChaCha8Rng>(&cell.values, DEFAULT_N_BINS, TieBreak::Lowest, out),
    }
}

/// The generative collator. `gen_ratio` comes from [`gen_ratio_for`].
pub fn collate_generative(cells: &[Cell], gen_ratio: f64, opt: &CollateOptions) -> GenerativeBatch {
    let b = cells.len();
    let longest = cells.iter().map(|c| c.genes.len() + 1).max().unwrap_or(1);
    let max_len = opt.max_seq_len.min(longest);
    let gen_len = ((max_len - 1) as f64 * gen_ratio) as usize;
    let pcpt_len = max_len - gen_len;
    let mut out = GenerativeBatch {
        batch: b,
        pcpt_len,
        gen_len,
        gen_ratio,
        pcpt_genes: vec![opt.pad_id as i64; b * pcpt_len],
        pcpt_values: vec![opt.pad_value; b * pcpt_len],
        pcpt_pad: vec![true; b * pcpt_len],
        gen_genes: vec![opt.pad_id as i64; b * gen_len],
        gen_target: vec![opt.pad_value; b * gen_len],
        gen_pad: vec![true; b * gen_len],
    };
    let mut binner = Binner::new();
    let mut bins = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        bin_cell(cell, opt, &mut binner, &mut bins);
        let n = cell.genes.len();
        order.clear();
        order.extend(0..n);
        order.shuffle(&mut cell_rng(opt, "scgpt-train: gen split", cell.key));
        let n_gen = (n as f64 * gen_ratio) as usize;
        let (gen, pcpt) = order.split_at(n_gen);
        let row = i * pcpt_len;
        out.pcpt_genes[row] = opt.cls_id as i64;
        out.pcpt_values[row] = opt.pad_value;
        out.pcpt_pad[row] = false;
        for (j, &g) in pcpt.iter().take(pcpt_len - 1).enumerate() {
            out.pcpt_genes[row + 1 + j] = cell.genes[g] as i64;
            out.pcpt_values[row + 1 + j] = bins[g] as f32;
            out.pcpt_pad[row + 1 + j] = false;
        }
        let row = i * gen_len;
        for (j, &g) in gen.iter().take(gen_len).enumerate() {
            out.gen_genes[row + j] = cell.genes[g] as i64;
            out.gen_target[row + j] = bins[g] as f32;
            out.gen_pad[row + j] = false;
        }
    }
    out
}

/// The masked-value collator.
pub fn collate_mlm(cells: &[Cell], mask_ratio: f64, opt: &CollateOptions) -> MlmBatch {
    let b = cells.len();
    let longest = cells.iter().map(|c| c.genes.len() + 1).max().unwrap_or(1);
    let len = opt.max_seq_len.min(longest);
    let mut out = MlmBatch::padded(b, len, opt);
    let mut binner = Binner::new();
    let mut bins = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        bin_cell(cell, opt, &mut binner, &mut bins);
        let n = cell.genes.len();
        order.clear();
        order.extend(0..n);
        if n + 1 > len {
            // Random subset, kept in input order (the model has no positions; order is moot).
            order.shuffle(&mut cell_rng(opt, "scgpt-train: mlm subsample", cell.key));
            order.truncate(len - 1);
            order.sort_unstable();
        }
        let mut mask_rng = cell_rng(opt, "scgpt-train: mlm mask", cell.key);
        let row = i * len;
        out.genes[row] = opt.cls_id as i64;
        out.values[row] = opt.pad_value;
        out.target[row] = opt.pad_value;
        out.pad[row] = false;
        for (j, &g) in order.iter().enumerate() {
            let at = row + 1 + j;
            let v = bins[g] as f32;
            out.genes[at] = cell.genes[g] as i64;
            out.target[at] = v;
            out.pad[at] = false;
            if mask_rng.random_bool(mask_ratio) {
                out.values[at] = opt.mask_value;
                out.masked[at] = true;
            } else {
                out.values[at] = v;
            }
        }
    }
    out
}

/// `[B, L]` tokens of whole cells for a classifier: no masking, `<cls>` first.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyBatch {
    pub batch: usize,
    pub len: usize,
    pub genes: Vec<i64>,
    pub values: Vec<f32>,
    pub pad: Vec<bool>,
    /// Class ids of the cells; set by the task.
    pub labels: Vec<i64>,
}

/// Cells as the fine-tuning tutorials tokenise them (`tokenize_and_pad_batch`,
/// `include_zero_gene=False`, `mask_ratio=0`): `<cls>` with `cls_value`, the nonzero genes
/// binned per cell, a cell longer than `max_seq_len` keeping a random subset (the same draws
/// as the masked-value collator's).
pub fn collate_classify(cells: &[Cell], cls_value: f32, opt: &CollateOptions) -> ClassifyBatch {
    let m = collate_mlm(cells, 0.0, opt);
    let mut values = m.target;
    for row in 0..m.batch {
        values[row * m.len] = cls_value;
    }
    ClassifyBatch { batch: m.batch, len: m.len, genes: m.genes, values, pad: m.pad, labels: Vec::new() }
}

/// How the fine-tuning tutorials tokenise and mask a cell (`tokenize_and_pad_batch`, then
/// `random_mask_value`).
#[derive(Debug, Clone, Copy)]
pub struct FinetuneTokens<'a> {
    /// The value of `<cls>` (0 in the tutorials).
    pub cls_value: f32,
    /// `include_zero_gene=True`: every one of these genes (model ids, ascending) is a token,
    /// the ones a cell lacks with value 0; `None`: the cell's nonzero genes.
    pub all_genes: Option<&'a [u32]>,
    /// Each cell masks exactly ⌊n·ratio⌋ of its n non-pad positions, `<cls>` included (as
    /// `random_mask_value`); 0 masks nothing.
    pub mask_ratio: f64,
}

/// Cells as the fine-tuning tutorials feed them: `<cls>` with `cls_value`, then the cell's
/// genes (all of `all_genes`, or the nonzero ones) with their per-cell bins, a longer cell
/// keeping a random `max_seq_len − 1` of them, and the exact-count mask. `target` holds the
/// unmasked values (`<cls>` included, as the tutorials' losses see it).
pub fn collate_finetune(cells: &[Cell], tokens: &FinetuneTokens, opt: &CollateOptions) -> MlmBatch {
    let b = cells.len();
    let width = |c: &Cell| tokens.all_genes.map_or(c.genes.len(), <[u32]>::len) + 1;
    let len = opt.max_seq_len.min(cells.iter().map(width).max().unwrap_or(1));
    let mut out = MlmBatch::padded(b, len, opt);
    let mut binner = Binner::new();
    let mut bins = Vec::new();
    let mut row_genes: Vec<(u32, f32)> = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        bin_cell(cell, opt, &mut binner, &mut bins);
        row_genes.clear();
        match tokens.all_genes {
            Some(all) => {
                // `all` is ascending: each of the cell's genes finds its slot by binary search.
                row_genes.extend(all.iter().map(|&g| (g, 0.0)));
                for (g, &v) in cell.genes.iter().zip(&bins) {
                    if let Ok(k) = all.binary_search(g) {
                        row_genes[k].1 = v as f32;
                    }
                }
            }
            None => row_genes.extend(cell.genes.iter().zip(&bins).map(|(&g, &v)| (g, v as f32))),
        }
        order.clear();
        order.extend(0..row_genes.len());
        if row_genes.len() + 1 > len {
            order.shuffle(&mut cell_rng(opt, "scgpt-train: finetune subsample", cell.key));
            order.truncate(len - 1);
            order.sort_unstable();
        }
        let row = i * len;
        out.genes[row] = opt.cls_id as i64;
        out.target[row] = tokens.cls_value;
        out.pad[row] = false;
        for (j, &k) in order.iter().enumerate() {
            let (g, v) = row_genes[k];
            out.genes[row + 1 + j] = g as i64;
            out.target[row + 1 + j] = v;
            out.pad[row + 1 + j] = false;
        }
        let n = order.len() + 1;
        out.values[row..row + n].copy_from_slice(&out.target[row..row + n]);
        let n_mask = (n as f64 * tokens.mask_ratio) as usize;
        if n_mask > 0 {
            let mut positions: Vec<usize> = (0..n).collect();
            positions.shuffle(&mut cell_rng(opt, "scgpt-train: finetune mask", cell.key));
            for &p in &positions[..n_mask] {
                out.values[row + p] = opt.mask_value;
                out.masked[row + p] = true;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt() -> CollateOptions {
        CollateOptions {
            max_seq_len: 12,
            cls_id: 1000,
            pad_id: 999,
            pad_value: -2.0,
            mask_value: -1.0,
            seed: Some(3),
            draw_seed: 7,
            epoch: 0,
        }
    }

    fn cell(n: usize, key: u64) -> Cell {
        Cell { genes: (0..n as u32).map(|g| g * 3 + 1).collect(), values: (0..n).map(|i| (i % 7 + 1) as f32).collect(), key }
    }

    #[test]
    fn generative_split_follows_the_original_lengths() {
        let cells = vec![cell(20, 0), cell(5, 1), cell(8, 2)];
        let b = collate_generative(&cells, 0.5, &opt());
        // L = min(12, 21) = 12; gen = floor(11 * 0.5) = 5; pcpt = 7.
        assert_eq!((b.pcpt_len, b.gen_len), (7, 5));
        for i in 0..3 {
            let row = &b.pcpt_genes[i * 7..(i + 1) * 7];
            assert_eq!(row[0], 1000, "cls first");
            assert!(!b.pcpt_pad[i * 7]);
            assert_eq!(b.pcpt_values[i * 7], -2.0);
        }
        // Cell 1 (5 genes): 2 gen, 3 pcpt genes (+cls), the rest padding.
        let gen_real: Vec<bool> = b.gen_pad[5..10].iter().map(|p| !p).collect();
        assert_eq!(gen_real, vec![true, true, false, false, false]);
        let pcpt_real = b.pcpt_pad[7..14].iter().filter(|p| !**p).count();
        assert_eq!(pcpt_real, 4);
        // Genes of a cell are split, not duplicated, and targets are its bins (1..=50).
        let mut seen: Vec<i64> =
            b.pcpt_genes[7..14].iter().chain(&b.gen_genes[5..10]).copied().filter(|&g| g != 999 && g != 1000).collect();
        seen.sort();
        assert_eq!(seen, vec![1, 4, 7, 10, 13]);
        assert!(b.gen_target.iter().zip(&b.gen_pad).all(|(t, p)| *p || (1.0..=50.0).contains(t)));
        // Padding carries the pad id and value.
        assert!(b.gen_genes.iter().zip(&b.gen_pad).all(|(g, p)| !*p || *g == 999));
    }

    #[test]
    fn a_cell_is_collated_the_same_in_any_batch() {
        let o = opt();
        let whole = collate_generative(&[cell(9, 10), cell(11, 11)], 0.25, &o);
        let alone = collate_generative(&[cell(11, 11)], 0.25, &o);
        // L = 12 in both; the cell's row is identical.
        assert_eq!(whole.pcpt_len, alone.pcpt_len);
        let p = whole.pcpt_len;
        let g = whole.gen_len;
        assert_eq!(&whole.pcpt_genes[p..2 * p], &alone.pcpt_genes[..p]);
        assert_eq!(&whole.gen_genes[g..2 * g], &alone.gen_genes[..g]);
        assert_eq!(&whole.gen_target[g..2 * g], &alone.gen_target[..g]);
    }

    #[test]
    fn seeds_and_epochs_change_the_draws_deterministically() {
        let o = opt();
        let a = collate_generative(&[cell(30, 5)], 0.5, &o);
        assert_eq!(a, collate_generative(&[cell(30, 5)], 0.5, &o));
        let b = collate_generative(&[cell(30, 5)], 0.5, &CollateOptions { epoch: 1, ..o });
        assert_ne!(a.gen_genes, b.gen_genes);
    }

    #[test]
    fn gen_ratio_is_one_of_the_choices_and_varies() {
        let ratios = [0.25, 0.5, 0.75];
        let drawn: Vec<f64> = (0..60).map(|s| gen_ratio_for(1, s, &ratios)).collect();
        assert!(drawn.iter().all(|r| ratios.contains(r)));
        for r in ratios {
            assert!(drawn.contains(&r));
        }
    }

    #[test]
    fn mlm_masks_only_genes_at_about_the_ratio() {
        let cells: Vec<Cell> = (0..40).map(|k| cell(11, k)).collect();
        let b = collate_mlm(&cells, 0.4, &opt());
        assert_eq!(b.len, 12);
        let mut masked = 0;
        for i in 0..40 {
            assert!(!b.masked[i * 12], "cls is never masked");
            for j in 0..12 {
                let at = i * 12 + j;
                if b.masked[at] {
                    masked += 1;
                    assert_eq!(b.values[at], -1.0);
                    assert!(b.target[at] >= 1.0);
                } else if j > 0 {
                    assert_eq!(b.values[at], b.target[at]);
                }
            }
        }
        let share = masked as f64 / (40.0 * 11.0);
        assert!((0.3..0.5).contains(&share), "masked share {share}");
    }

    #[test]
    fn classify_batches_are_unmasked_with_the_cls_value() {
        let cells: Vec<Cell> = (0..4).map(|k| cell(30, k)).collect();
        let b = collate_classify(&cells, 0.0, &opt());
        let m = collate_mlm(&cells, 0.4, &opt());
        assert_eq!((b.len, b.genes.clone()), (m.len, m.genes.clone()), "same tokens as the masked collator");
        for i in 0..4 {
            assert_eq!(b.values[i * b.len], 0.0);
            assert!(b.values[i * b.len + 1..(i + 1) * b.len].iter().all(|v| (1.0..=50.0).contains(v)));
        }
    }

    #[test]
    fn long_cells_are_subsampled_keeping_cls() {
        let b = collate_mlm(&[cell(50, 1)], 0.4, &opt());
        assert_eq!(b.len, 12);
        assert_eq!(b.genes[0], 1000);
        assert!(b.pad.iter().all(|p| !p));
    }

    #[test]
    fn finetune_masks_exactly_the_share_of_each_cell_cls_included() {
        let cells: Vec<Cell> = (0..60).map(|k| cell(7 + (k as usize % 5), k)).collect();
        let t = FinetuneTokens { cls_value: 0.0, all_genes: None, mask_ratio: 0.4 };
        let b = collate_finetune(&cells, &t, &opt());
        let mut cls_masked = 0;
        for (i, c) in cells.iter().enumerate() {
            let n = (c.genes.len() + 1).min(b.len);
            let row = i * b.len;
            let masked = b.masked[row..row + b.len].iter().filter(|m| **m).count();
            assert_eq!(masked, (n as f64 * 0.4) as usize, "cell {i}: exactly floor(n * ratio)");
            assert_eq!(b.target[row], 0.0, "cls target is its value");
            cls_masked += usize::from(b.masked[row]);
            for j in 0..b.len {
                let at = row + j;
                assert_eq!(b.masked[at], b.values[at] == -1.0, "masked positions carry mask_value");
                assert!(!(b.pad[at] && b.masked[at]), "padding is never masked");
            }
        }
        assert!(cls_masked > 5 && cls_masked < 55, "<cls> is masked as often as a gene: {cls_masked}");
        // Another epoch draws other masks.
        let b1 = collate_finetune(&cells, &t, &CollateOptions { epoch: 1, ..opt() });
        assert_ne!(b.masked, b1.masked);
    }

    #[test]
    fn finetune_with_zero_genes_has_every_gene_of_the_set() {
        let all: Vec<u32> = (0..15).collect();
        let c = Cell { genes: vec![3, 9, 1], values: vec![5.0, 1.0, 2.0], key: 4 };
        let t = FinetuneTokens { cls_value: 0.0, all_genes: Some(&all), mask_ratio: 0.0 };
        let o = CollateOptions { max_seq_len: 100, ..opt() };
        let b = collate_finetune(std::slice::from_ref(&c), &t, &o);
        assert_eq!(b.len, 16);
        assert_eq!(b.genes[0], o.cls_id as i64);
        assert_eq!(&b.genes[1..], &(0..15).collect::<Vec<i64>>()[..]);
        // The three nonzero genes keep their per-cell bins (rank order 9 < 1 < 3); the rest are 0.
        let (v1, v3, v9) = (b.values[2], b.values[4], b.values[10]);
        assert!(v9 >= 1.0 && v9 < v1 && v1 < v3, "{v9} {v1} {v3}");
        assert_eq!(b.values.iter().filter(|v| **v > 0.0).count(), 3);
        assert!(b.masked.iter().all(|m| !m));
        // Longer than max_seq_len: <cls> plus a subset of the genes.
        let short = collate_finetune(std::slice::from_ref(&c), &t, &CollateOptions { max_seq_len: 6, ..o });
        assert_eq!(short.len, 6);
        assert_eq!(short.genes[0], o.cls_id as i64);
    }
}
