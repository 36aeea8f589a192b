//! Integer-valued floats (UMI counts) tested and converted without a float-to-int conversion.
//!
//! Adding 2^23 to a float in [0, 2^23) rounds it to an integer held in the low mantissa bits.
//! The default x86-64 target has no vector unsigned conversion, and the saturating casts
//! `v as u32` compiled to scalar sequences that were a third of the cost of data-prep's
//! per-value loops; these are plain float adds, compares and masks, which vectorise.

const MAGIC: f32 = 8_388_608.0; // 2^23

/// The largest `hi` the tests below accept: 2^23.
pub const LIMIT: f32 = MAGIC;

/// `v` is an integer in `[lo, hi)`, with `0 <= lo` and `hi <= 2^23`. False for NaN; true for
/// -0.0 when `lo` is 0 (use [`is_plain_int_below`] where the sign bit matters).
#[inline]
pub fn is_int_in(v: f32, lo: f32, hi: f32) -> bool {
    v >= lo && v < hi && (v + MAGIC) - MAGIC == v
}

/// `v` is a non-negative integer below `hi` (at most 2^23) with the sign bit clear, so that
/// [`value`] round-trips its bit pattern exactly.
#[inline]
pub fn is_plain_int_below(v: f32, hi: f32) -> bool {
    is_int_in(v, 0.0, hi) && v.to_bits() >> 31 == 0
}

/// The integer value of `v`, for `v` that passed [`is_int_in`].
#[inline]
pub fn value(v: f32) -> u32 {
    (v + MAGIC).to_bits() & 0x7F_FFFF
}

/// [`is_int_in`], [`is_plain_int_below`] and [`value`] on sixteen lanes, for the AVX-512
/// kernels that test and convert values already in a register.
#[cfg(target_arch = "x86_64")]
pub mod lanes {
    use std::arch::x86_64::*;

    /// `v + 2^23` per lane: [`value`]'s bits and the rounding [`is_int_in`] compares.
    ///
    /// # Safety
    /// The CPU has AVX-512F (callers check [`crate::simd::avx512f`]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn shifted(v: __m512) -> __m512 {
        _mm512_add_ps(v, _mm512_set1_ps(super::MAGIC))
    }

    /// [`super::is_int_in`] per lane, from `v` and its [`shifted`].
    ///
    /// # Safety
    /// The CPU has AVX-512F (callers check [`crate::simd::avx512f`]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn is_int_in(v: __m512, shifted: __m512, lo: f32, hi: f32) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, _mm512_set1_ps(lo))
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(hi))
            & _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(shifted, _mm512_set1_ps(super::MAGIC)), v)
    }

    /// [`super::is_plain_int_below`] per lane, from `v` and its [`shifted`].
    ///
    /// # Safety
    /// The CPU has AVX-512F (callers check [`crate::simd::avx512f`]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn is_plain_int_below(v: __m512, shifted: __m512, hi: f32) -> __mmask16 {
        is_int_in(v, shifted, 0.0, hi) & _mm512_testn_epi32_mask(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN))
    }

    /// [`super::value`] per lane, from the lanes' [`shifted`].
    ///
    /// # Safety
    /// The CPU has AVX-512F (callers check [`crate::simd::avx512f`]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn value(shifted: __m512) -> __m512i {
        _mm512_and_si512(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x7F_FFFF))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_pass_and_convert_everything_else_fails() {
        for i in [0u32, 1, 2, 7, 4095, 4096, 65_535, 8_388_607] {
            let v = i as f32;
            assert!(is_int_in(v, 0.0, MAGIC), "{i}");
            assert_eq!(value(v), i);
        }
        for v in [0.5f32, 1.5, 2.999, -1.0, f32::NAN, f32::INFINITY, 8_388_608.0, 1e-30] {
            assert!(!is_int_in(v, 0.0, MAGIC), "{v}");
        }
        assert!(!is_int_in(0.0, 1.0, 10.0) && !is_int_in(10.0, 1.0, 10.0));
        assert!(is_int_in(-0.0, 0.0, 10.0) && !is_plain_int_below(-0.0, 10.0) && is_plain_int_below(0.0, 10.0));
    }
}
