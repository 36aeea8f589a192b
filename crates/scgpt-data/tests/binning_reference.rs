//! Binning against the original's `scgpt.preprocess.binning`, run by
//! `tests/gen/gen_binning_reference.py` on the installed scgpt 0.2.4 package.
//! `bins_lo`/`bins_hi` are the original's output with its uniform draw pinned just under 1 and at
//! 0: the lowest and highest bin it can give each value.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use scgpt_data::binning::{Binner, TieBreak, DEFAULT_N_BINS};

#[derive(serde::Deserialize)]
struct Row {
    name: String,
    values: Vec<f32>,
    bins_lo: Vec<u8>,
    bins_hi: Vec<u8>,
    tie_free: bool,
}

fn rows() -> Vec<Row> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/binning_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn lowest_tie_break_equals_the_original_lowest_bins() {
    let rows = rows();
    assert!(rows.len() >= 30);
    let mut binner = Binner::new();
    let mut out = Vec::new();
    for r in &rows {
        binner.bin_row::<ChaCha8Rng>(&r.values, DEFAULT_N_BINS, TieBreak::Lowest, &mut out);
        assert_eq!(out, r.bins_lo, "row {}", r.name);
        // The shard path bins only the nonzero values (and takes the integer fast path for counts).
        let nonzero: Vec<f32> = r.values.iter().copied().filter(|v| *v != 0.0).collect();
        let want: Vec<u8> = r.bins_lo.iter().zip(&r.values).filter(|(_, v)| **v != 0.0).map(|(b, _)| *b).collect();
        binner.bin_nonzero::<ChaCha8Rng>(&nonzero, DEFAULT_N_BINS, TieBreak::Lowest, &mut out);
        assert_eq!(out, want, "row {} (nonzero path)", r.name);
    }
}

#[test]
fn tie_free_cells_match_the_original_exactly() {
    let mut binner = Binner::new();
    let mut out = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut checked = 0;
    for r in rows().iter().filter(|r| r.tie_free && r.values.iter().filter(|v| **v != 0.0).count() > 1) {
        assert_eq!(r.bins_lo, r.bins_hi, "tie-free row {} has a deterministic answer", r.name);
        binner.bin_row(&r.values, DEFAULT_N_BINS, TieBreak::Random(&mut rng), &mut out);
        assert_eq!(out, r.bins_lo, "row {}", r.name);
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} tie-free rows");
}

#[test]
fn random_ties_stay_in_the_original_range_and_use_all_of_it() {
    let mut binner = Binner::new();
    let mut out = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut hit_lo = 0;
    let mut hit_hi = 0;
    for r in rows() {
        for _ in 0..20 {
            binner.bin_row(&r.values, DEFAULT_N_BINS, TieBreak::Random(&mut rng), &mut out);
            for (k, &b) in out.iter().enumerate() {
                assert!(
                    r.bins_lo[k] <= b && b <= r.bins_hi[k],
                    "row {} value {}: {b} outside {}..={}",
                    r.name,
                    r.values[k],
                    r.bins_lo[k],
                    r.bins_hi[k]
                );
                if r.bins_lo[k] < r.bins_hi[k] {
                    hit_lo += (b == r.bins_lo[k]) as usize;
                    hit_hi += (b == r.bins_hi[k]) as usize;
                }
            }
        }
    }
    assert!(hit_lo > 0 && hit_hi > 0, "random tie-breaking reaches both ends of tied ranges");
}
