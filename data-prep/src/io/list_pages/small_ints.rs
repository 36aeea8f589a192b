//! Integer counts as a dictionary: which of the values below [`SMALL_INTS`] a chunk holds
//! (an AVX-512 pass beside its portable twin), their ranks, and the values packed as ranks.

use super::*;

/// Values below this that are integers (UMI counts) get the table path.
pub(super) const SMALL_INTS: usize = 1 << 12;

/// When every value is an integer in `0..SMALL_INTS`: the distinct values ascending and a
/// value → index table. Branch-free passes instead of a lookup-and-insert per value.
#[inline]
pub(super) fn small_integer_dictionary(values: &Segments<f32>) -> Option<(Vec<f32>, Box<[u16; SMALL_INTS]>)> {
    // Fixed-size tables indexed through a mask: no bounds checks in the per-value loops.
    let mut present = Box::new([false; SMALL_INTS]);
    // Part by part: through a flattening iterator, its end-of-part test per value was half
    // this function's time.
    if !values.parts().iter().all(|p| mark_small_ints(p, &mut present)) {
        return None;
    }
    let mut rank = Box::new([0u16; SMALL_INTS]);
    let mut dict = Vec::new();
    for (v, _) in present.iter().enumerate().filter(|(_, p)| **p) {
        rank[v] = dict.len() as u16;
        dict.push(v as f32);
    }
    if dict.is_empty() {
        dict.push(0.0);
    }
    Some((dict, rank))
}

/// Marks each of `values` in `present` if every one is a plain integer below [`SMALL_INTS`]
/// (-0.0 and NaN fall to the general path, which keeps bit patterns apart); false otherwise,
/// with `present` then meaningless.
#[inline]
pub(super) fn mark_small_ints(values: &[f32], present: &mut [bool; SMALL_INTS]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if scgpt_data::simd::avx512f() {
        // SAFETY: the feature is present.
        return unsafe { mark_small_ints_avx512(values, present) };
    }
    mark_small_ints_scalar(values, present)
}

#[inline]
pub(super) fn mark_small_ints_scalar(values: &[f32], present: &mut [bool; SMALL_INTS]) -> bool {
    // No early exit, so the check vectorises; the mask bounds the marks of values that fail it.
    let ok = values.iter().fold(true, |ok, &v| ok & small_int::is_plain_int_below(v, SMALL_INTS as f32));
    for &v in values {
        present[small_int::value(v) as usize & (SMALL_INTS - 1)] = true;
    }
    ok
}

/// [`mark_small_ints`] sixteen values at a time: the check and the integer conversion in
/// registers, in one pass instead of two (the scalar conversion was most of the marking).
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mark_small_ints_avx512(values: &[f32], present: &mut [bool; SMALL_INTS]) -> bool {
    use std::arch::x86_64::*;
    let low12 = _mm512_set1_epi32(SMALL_INTS as i32 - 1);
    let mut bad: __mmask16 = 0;
    let mut index = [0u32; 16];
    let mut groups = values.chunks_exact(16);
    for g in &mut groups {
        // SAFETY: a group is 16 values; `index` holds 16 words.
        unsafe {
            let v = _mm512_loadu_ps(g.as_ptr());
            let shifted = small_int::lanes::shifted(v);
            bad |= !small_int::lanes::is_plain_int_below(v, shifted, SMALL_INTS as f32);
            _mm512_storeu_si512(index.as_mut_ptr().cast(), _mm512_and_si512(small_int::lanes::value(shifted), low12));
        }
        for &i in &index {
            present[i as usize & (SMALL_INTS - 1)] = true;
        }
    }
    mark_small_ints_scalar(groups.remainder(), present) && bad == 0
}

#[cfg(test)]
/// [`dictionary_indices`] of small integer values through their `rank`.
#[inline]
pub(super) fn small_int_indices(values: &[f32], rank: &[u16; SMALL_INTS], width: u8, buf: &mut Vec<u8>) {
    indices_header(values.len(), width, buf);
    small_int_pack(values, rank, width, buf);
}

/// [`pack_indices`] of small integer values through their `rank`, each group of eight looked
/// up and packed in one step (staging the indices first, with a bounds check per lookup, was
/// half the expressions' encoding time). Every value is an integer below [`SMALL_INTS`]
/// (checked by [`small_integer_dictionary`]; the mask bounds the lookups).
#[inline]
pub(super) fn small_int_pack(values: &[f32], rank: &[u16; SMALL_INTS], width: u8, buf: &mut Vec<u8>) {
    let index = |v: f32| rank[small_int::value(v) as usize & (SMALL_INTS - 1)] as u32;
    // Dictionaries here have at most SMALL_INTS entries: 12 bits.
    if width == 0 || width > 12 {
        return pack_indices(values.iter().map(|&v| index(v)), values.len(), width, buf);
    }
    let whole = values.len() / 8 * 8;
    // The last group, if short, is padded with index 0.
    let mut tail = [0u32; 8];
    tail.iter_mut().zip(&values[whole..]).for_each(|(t, &v)| *t = index(v));
    macro_rules! widths {
        ($($w:literal)*) => {
            match width {
                $($w => {
                    pack_width_map::<$w, f32>(&values[..whole], index, buf);
                    pack_width::<$w>(&tail[..values.len().div_ceil(8) * 8 - whole], buf);
                })*
                _ => unreachable!("width checked above"),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8 9 10 11 12);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_int_marks_and_indices_agree_with_a_plain_reading() {
        let odd = [-0.0f32, f32::NAN, 0.5, -1.0, 4095.0, 4096.0, 1e9, f32::INFINITY, 0.0];
        let mut x = 7u64;
        for n in [0usize, 1, 15, 16, 17, 40, 1000] {
            for mix in 0..=odd.len() {
                let mut next = || {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (x >> 33) as usize
                };
                let mut vals: Vec<f32> = (0..n).map(|_| (next() % 300) as f32).collect();
                if mix < odd.len() && n > 0 {
                    let at = next() % n;
                    vals[at] = odd[mix];
                }
                let plain = vals.iter().all(|&v| (0.0..4096.0).contains(&v) && v.fract() == 0.0 && v.to_bits() >> 31 == 0);
                let mut want = [false; SMALL_INTS];
                vals.iter().for_each(|&v| want[v as usize % SMALL_INTS] = true);
                for vector in [true, false] {
                    let mut got = Box::new([false; SMALL_INTS]);
                    let ok = if vector { mark_small_ints(&vals, &mut got) } else { mark_small_ints_scalar(&vals, &mut got) };
                    assert_eq!(ok, plain, "{n} values, mix {mix}, vector {vector}");
                    if plain {
                        assert!(got.iter().eq(want.iter()), "{n} values, mix {mix}, vector {vector}");
                    }
                }
                // Indices through the rank table pack as the general path packs them.
                if plain {
                    let (dict, rank) = small_integer_dictionary(&Segments::from(&vals[..])).expect("plain integers");
                    let width = bit_width(dict.len() as u64 - 1);
                    let (mut fast, mut general) = (vec![5u8], vec![5u8]);
                    small_int_indices(&vals, &rank, width, &mut fast);
                    dictionary_indices(vals.iter().map(|v| dict.iter().position(|d| d == v).unwrap() as u32), n, width, &mut general);
                    assert_eq!(fast, general, "{n} values, width {width}");
                }
            }
        }
    }
}
