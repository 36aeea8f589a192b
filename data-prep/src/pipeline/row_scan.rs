//! Row scans: a row's kept entries copied to the front of the output with their vocabulary
//! ids, and what the copy learns of the values on the way (integers? all at least 1? largest,
//! total); and the block-wide key that checks values are finite and not negative. The
//! AVX-512 kernel sits beside its portable twin, and a test compares the two.

use super::*;

/// An f32 is finite and not negative exactly when this key is below [`POSITIVE_INFINITY_BITS`]:
/// its bits, with -0.0 (which is not negative) read as 0.0. Negatives have the sign bit set and
/// NaN and infinity an all-ones exponent, so one vectorised `max` checks a whole block.
#[inline]
pub(super) fn nonnegative_finite_key(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits == 0x8000_0000 {
        0
    } else {
        bits
    }
}
pub(super) const POSITIVE_INFINITY_BITS: u32 = 0x7f80_0000;

/// Vocabulary id per input column, [`GeneId::NONE`] for dropped genes, in 16 bits when the
/// vocabulary allows: looked up for every value, and the whole-human vocabulary's 60,697 ids
/// as u32 (240 KB at CELLxGENE's 60k columns) missed the first-level cache twice as often.
pub(super) enum GeneTable {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

impl GeneTable {
    #[inline]
    pub(super) fn new(ids: &[Option<u32>], vocab_len: usize) -> Self {
        // One padding entry past the columns: a 32-bit gather of the last 16-bit entry reads it.
        if vocab_len < u16::NONE as usize {
            GeneTable::Narrow(ids.iter().map(|g| g.map_or(u16::NONE, |id| id as u16)).chain([u16::NONE]).collect())
        } else {
            GeneTable::Wide(ids.iter().map(|g| g.unwrap_or(u32::NONE)).chain([u32::NONE]).collect())
        }
    }
}

pub(super) trait GeneId: Copy + Eq {
    /// Marks an input gene that is not in the vocabulary or was filtered out.
    const NONE: Self;
    /// Bytes per entry, the scale of a 32-bit gather from the table.
    const BYTES: usize;
    fn id(self) -> i32;
}

impl GeneId for u16 {
    const NONE: u16 = u16::MAX;
    const BYTES: usize = 2;
    fn id(self) -> i32 {
        self as i32
    }
}

impl GeneId for u32 {
    const NONE: u32 = u32::MAX;
    const BYTES: usize = 4;
    fn id(self) -> i32 {
        self as i32
    }
}

/// What copying a row's kept entries learnt of its values on the way, so no later pass reads
/// them again to check or total them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RowScan {
    /// Entries kept (a gene in the table, a nonzero value), written at the front of the outputs.
    pub(super) kept: usize,
    /// Every stored value is an integer in `0..2^23` ([`small_int::LIMIT`]); the kept ones are
    /// then integers in `1..2^23`, and `max` and `sum` are theirs.
    pub(super) integer: bool,
    /// Every stored value is at least 1.
    pub(super) at_least_one: bool,
    pub(super) max: u32,
    pub(super) sum: u64,
}

impl RowScan {
    /// Folds stored values `vals` in, of which `kept` were kept.
    fn add(mut self, vals: &[f32], kept: &[f32]) -> Self {
        // No early exits, so the folds vectorise.
        self.integer &= vals.iter().fold(true, |ok, &v| ok & small_int::is_int_in(v, 0.0, small_int::LIMIT));
        self.at_least_one &= vals.iter().fold(true, |ok, &v| ok & (v >= 1.0));
        self.max = kept.iter().fold(self.max, |m, &v| m.max(small_int::value(v)));
        self.sum += kept.iter().map(|&v| small_int::value(v) as u64).sum::<u64>();
        self.kept += kept.len();
        self
    }
}

const EMPTY_SCAN: RowScan = RowScan { kept: 0, integer: true, at_least_one: true, max: 0, sum: 0 };

/// Copies the kept entries of a row (a gene in the table, a nonzero value) to the front of
/// `genes` (vocabulary ids) and `values`, each with room for every entry, and scans its values.
/// Every column index is below `table.len() - 1` (the reader checked them against the gene
/// count; the table has one entry of padding).
#[inline]
pub(super) fn compact_row<G: GeneId>(
    table: &[G],
    cols: &[u32],
    vals: &[f32],
    genes: &mut [std::mem::MaybeUninit<i32>],
    values: &mut [std::mem::MaybeUninit<f32>],
) -> RowScan {
    assert!(genes.len() >= cols.len() && values.len() >= cols.len() && vals.len() == cols.len());
    #[cfg(target_arch = "x86_64")]
    if scgpt_data::simd::avx512f() {
        // SAFETY: the feature is present; the bounds are as the function's contract and the
        // assert above say.
        return unsafe { compact_row_avx512(table, cols, vals, genes.as_mut_ptr().cast(), values.as_mut_ptr().cast()) };
    }
    compact_row_scalar(table, cols, vals, genes, values, 0, EMPTY_SCAN)
}

/// [`compact_row`] from entry `i` on, with `scan` of the entries before it. Branch-free: each
/// entry is written, and the slot moves on only if it is kept.
fn compact_row_scalar<G: GeneId>(
    table: &[G],
    cols: &[u32],
    vals: &[f32],
    genes: &mut [std::mem::MaybeUninit<i32>],
    values: &mut [std::mem::MaybeUninit<f32>],
    i: usize,
    scan: RowScan,
) -> RowScan {
    let first = scan.kept;
    let mut k = first;
    for (&c, &v) in cols[i..].iter().zip(&vals[i..]) {
        let id = table[c as usize];
        genes[k].write(id.id());
        values[k].write(v);
        k += (id != G::NONE && v != 0.0) as usize;
    }
    // SAFETY: slots first..k were written above.
    let kept = unsafe { std::slice::from_raw_parts(values[first..k].as_ptr().cast::<f32>(), k - first) };
    scan.add(&vals[i..], kept)
}

/// [`compact_row`] sixteen entries at a time: a gather from the table, two compares and two
/// compressions into a register (a compressing store to memory is microcoded on AMD's cores),
/// stored whole, the slot moving on by the kept count; the checks, largest and total of the
/// values on the registers already loaded. The scalar loop took 15% of a run's CPU (two bounds
/// checks and a dependent table load per value), the separate folds over the values 8%.
///
/// # Safety
/// AVX-512F is available; `genes` and `values` have room for `cols.len()` entries; every
/// column index is below `table.len() - 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn compact_row_avx512<G: GeneId>(table: &[G], cols: &[u32], vals: &[f32], genes: *mut i32, values: *mut f32) -> RowScan {
    use std::arch::x86_64::*;
    let n = cols.len();
    let base = table.as_ptr() as *const i32;
    // A 16-bit entry is gathered as the 32 bits at its address (the padding entry keeps the
    // last one in bounds), then masked.
    let (none, mask) = match G::BYTES {
        2 => (_mm512_set1_epi32(u16::MAX as i32), _mm512_set1_epi32(0xFFFF)),
        _ => (_mm512_set1_epi32(-1), _mm512_set1_epi32(-1)),
    };
    let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
    let (mut max, mut sum_lo, mut sum_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
    let (mut not_integer, mut below_one): (__mmask16, __mmask16) = (0, 0);
    let (mut i, mut k) = (0, 0);
    while i + 16 <= n {
        // SAFETY: i + 16 <= n for the loads; the gathered addresses are table entries (plus
        // two bytes of the padding entry); k <= i, so the 16 stores end by slot n.
        unsafe {
            let idx = _mm512_loadu_si512(cols.as_ptr().add(i).cast());
            let raw = if G::BYTES == 2 { _mm512_i32gather_epi32::<2>(idx, base) } else { _mm512_i32gather_epi32::<4>(idx, base) };
            let ids = _mm512_and_si512(raw, mask);
            let v = _mm512_loadu_ps(vals.as_ptr().add(i));
            let keep = _mm512_cmpneq_epi32_mask(ids, none) & _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, zero);
            _mm512_storeu_si512(genes.add(k).cast(), _mm512_maskz_compress_epi32(keep, ids));
            _mm512_storeu_ps(values.add(k), _mm512_maskz_compress_ps(keep, v));
            k += keep.count_ones() as usize;
            let shifted = small_int::lanes::shifted(v);
            not_integer |= !small_int::lanes::is_int_in(v, shifted, 0.0, small_int::LIMIT);
            below_one |= !_mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, one);
            let x = _mm512_maskz_mov_epi32(keep, small_int::lanes::value(shifted));
            max = _mm512_max_epu32(max, x);
            sum_lo = _mm512_add_epi64(sum_lo, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(x)));
            sum_hi = _mm512_add_epi64(sum_hi, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(x)));
        }
        i += 16;
    }
    let scan = RowScan {
        kept: k,
        integer: not_integer == 0,
        at_least_one: below_one == 0,
        max: _mm512_reduce_max_epu32(max),
        sum: _mm512_reduce_add_epi64(_mm512_add_epi64(sum_lo, sum_hi)) as u64,
    };
    // SAFETY: the caller's slices, rebuilt from their pointers and length.
    let (genes, values) = unsafe { (std::slice::from_raw_parts_mut(genes.cast(), n), std::slice::from_raw_parts_mut(values.cast(), n)) };
    compact_row_scalar(table, cols, vals, genes, values, i, scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_value_key_agrees_with_float_comparison() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            3.5,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            -1.0,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        let ramp = (0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        for v in specials.into_iter().chain(ramp) {
            let ok = v >= 0.0 && v.is_finite();
            assert_eq!(nonnegative_finite_key(v) < POSITIVE_INFINITY_BITS, ok, "{v:e} ({:#x})", v.to_bits());
        }
    }

    #[test]
    fn vector_compaction_keeps_and_scans_what_the_scalar_loop_does() {
        let n_vars = 1000;
        let ids: Vec<Option<u32>> = (0..n_vars as u32).map(|g| (g % 7 != 3).then_some(g * 60)).collect();
        let (narrow, wide) = (GeneTable::new(&ids, 60_697), GeneTable::new(&ids, 70_000));
        fn run<G: GeneId>(table: &[G], cols: &[u32], vals: &[f32], vector: bool) -> (Vec<i32>, Vec<f32>, RowScan) {
            let (mut g, mut v) = (Vec::<i32>::with_capacity(cols.len()), Vec::<f32>::with_capacity(cols.len()));
            let (gs, vs) = (&mut g.spare_capacity_mut()[..cols.len()], &mut v.spare_capacity_mut()[..cols.len()]);
            let scan =
                if vector { compact_row(table, cols, vals, gs, vs) } else { compact_row_scalar(table, cols, vals, gs, vs, 0, EMPTY_SCAN) };
            // SAFETY: both write the first `kept` slots.
            unsafe {
                g.set_len(scan.kept);
                v.set_len(scan.kept);
            }
            (g, v, scan)
        }
        let mut x = 12345u64;
        // Values of every kind a row may hold, in rows of plain counts with one odd value, and
        // rows drawn from all of them.
        let odd = [0.0f32, -0.0, 0.5, 1.5, -1.0, f32::NAN, f32::INFINITY, 8_388_607.0, 8_388_608.0, 4095.0, 4096.0, 1e-30];
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 2049] {
            for mix in 0..=odd.len() + 1 {
                let mut next = || {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (x >> 33) as u32
                };
                // The last column included, to reach the padding entry.
                let cols: Vec<u32> = (0..n).map(|i| if i % 5 == 0 { n_vars as u32 - 1 } else { next() % n_vars as u32 }).collect();
                let mut vals: Vec<f32> = (0..n).map(|_| (next() % 4) as f32).collect();
                if mix < odd.len() && n > 0 {
                    let at = next() as usize % n;
                    vals[at] = odd[mix];
                } else if mix == odd.len() {
                    vals.iter_mut().for_each(|v| *v = odd[next() as usize % odd.len()]);
                }
                for vector in [true, false] {
                    let GeneTable::Narrow(t) = &narrow else { unreachable!() };
                    let (g, v, scan) = run(t, &cols, &vals, vector);
                    let GeneTable::Wide(w) = &wide else { unreachable!() };
                    let (wg, wv, wscan) = run(w, &cols, &vals, vector);
                    // An independent reading of the same row.
                    let kept: Vec<(i32, f32)> = cols
                        .iter()
                        .zip(&vals)
                        .filter_map(|(&c, &v)| ids[c as usize].filter(|_| v != 0.0).map(|id| (id as i32, v)))
                        .collect();
                    let integer = vals.iter().all(|&v| (0.0..8_388_608.0).contains(&v) && v.fract() == 0.0);
                    let what = format!("{n} entries, mix {mix}, vector {vector}");
                    assert_eq!(g, kept.iter().map(|p| p.0).collect::<Vec<_>>(), "{what}");
                    assert_eq!(
                        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        kept.iter().map(|p| p.1.to_bits()).collect::<Vec<_>>(),
                        "{what}"
                    );
                    assert_eq!(
                        (wg, wv.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), wscan),
                        (g, v.iter().map(|x| x.to_bits()).collect(), scan),
                        "{what}: wide table"
                    );
                    assert_eq!(scan.kept, kept.len(), "{what}");
                    assert_eq!((scan.integer, scan.at_least_one), (integer, vals.iter().all(|&v| v >= 1.0)), "{what}");
                    if integer {
                        assert_eq!(scan.max, kept.iter().map(|p| p.1 as u32).max().unwrap_or(0), "{what}");
                        assert_eq!(scan.sum, kept.iter().map(|p| p.1 as u64).sum::<u64>(), "{what}");
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        eprintln!("{}", scgpt_data::simd::describe());
    }
}
