//! Inference self-attention on the CPU (Flex), straight from the packed `Wqkv` output.
//!
//! For each (cell, head), on all cores: one Q·Kᵀ gemm into a per-thread `[L, L]` score matrix,
//! a row softmax with a branch-free exp the compiler vectorises, and one P·V gemm that writes
//! into the merged-head `[B, L, d]` layout. Q, K and V are read in place from `[B, L, 3d]`
//! through strides, so the head split and merge copies disappear too. Flex's fused kernel
//! tiles the keys by 64 and calls libm's scalar `expf` per score: at 1,200 tokens that was a
//! third of `scgpt embed`'s time (docs/benchmarks.md).

use burn::tensor::{Bool, Device, Tensor, TensorData};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// `softmax(Q Kᵀ / √dh) V` with key padding (`true` = pad), heads merged: `[B, L, 3d]` →
/// `[B, L, d]`. The caller checks the device is Flex, f32 and not autodiff.
pub(crate) fn attention_packed(qkv: Tensor<3>, nhead: usize, key_padding: Option<Tensor<2, Bool>>, device: &Device) -> Tensor<3> {
    let [b, l, d3] = qkv.dims();
    let d = d3 / 3;
    let dh = d / nhead;
    let qkv: Vec<f32> = qkv.into_data().convert::<f32>().try_into_vec().expect("f32 qkv");
    let pad: Option<Vec<bool>> = key_padding.map(|m| m.into_data().try_into_vec::<bool>().expect("bool mask"));
    let mut out = vec![0f32; b * l * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let scale = 1.0 / (dh as f32).sqrt();
    (0..b * nhead).into_par_iter().for_each_init(
        || (vec![0f32; l * l], vec![1f32; l]),
        |(scores, keep), bh| {
            let (cell, head) = (bh / nhead, bh % nhead);
            let base = cell * l * d3;
            let q = qkv[base + head * dh..].as_ptr();
            let k = qkv[base + d + head * dh..].as_ptr();
            let v = qkv[base + 2 * d + head * dh..].as_ptr();
            let rs = d3 as isize;
            // SAFETY: the slices above hold L rows of stride 3d from their offsets; the output
            // block of (cell, head) is written by this task alone.
            unsafe {
                // scores[i, j] = scale · Σ_c q[i, c] k[j, c]
                gemm(
                    l,
                    l,
                    dh,
                    scores.as_mut_ptr(),
                    1,
                    l as isize,
                    false,
                    q,
                    1,
                    rs,
                    k,
                    rs,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            let any_pad = match &pad {
                Some(p) => {
                    let row = &p[cell * l..(cell + 1) * l];
                    for (w, &is_pad) in keep.iter_mut().zip(row) {
                        *w = if is_pad { 0.0 } else { 1.0 };
                    }
                    row.contains(&true)
                }
                None => false,
            };
            for row in scores.chunks_exact_mut(l) {
                softmax_row(row, any_pad.then_some(&keep[..]));
            }
            // SAFETY: `out` holds b·l rows of d floats; (cell, head)'s L × dh block starting
            // there (row stride d) is written by this task alone, `scores` is this task's
            // L × L buffer and v holds L rows of stride 3d.
            unsafe {
                let o = out_ptr.get().add(cell * l * d + head * dh);
                gemm(
                    l,
                    dh,
                    l,
                    o,
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    l as isize,
                    v,
                    1,
                    rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
    Tensor::from_data(TensorData::new(out, [b, l, d]), device)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only offset to blocks that each parallel task writes alone (see the
// gemm into `out`), and `out` outlives the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send; no two tasks write the same element.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// In-place softmax of one score row; keys with `keep = 0` get weight exactly 0 (as the
/// original's `-inf` fill). A row with every key masked is left at 0. Compiled a second time
/// for AVX2 + FMA and picked at run time: the baseline x86-64 target has 4-wide SSE2 only.
fn softmax_row(row: &mut [f32], keep: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { softmax_row_avx2(row, keep) };
    }
    softmax_row_portable(row, keep)
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // Read as scgpt_data::simd::portable reads it (this crate does not depend on scgpt-data).
        let portable = std::env::var("SCGPT_PORTABLE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True"));
        !portable && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// [`softmax_row_portable`] compiled for AVX2 + FMA (the same arithmetic in the same order:
/// Rust does not contract `a * b + c` into an FMA, so both give the same bits).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], keep: Option<&[f32]>) {
    softmax_row_portable(row, keep)
}

/// Lanes of the max and sum reductions: a fixed split, so every build and path adds in the
/// same order. One running max or sum is a chain of dependent adds (3–4 cycles each), which
/// kept these two passes scalar however wide the vectors.
const LANES: usize = 8;

#[inline(always)]
fn softmax_row_portable(row: &mut [f32], keep: Option<&[f32]>) {
    let max = match keep {
        Some(k) => {
            let mut m = [f32::NEG_INFINITY; LANES];
            let (rows, ks) = (row.chunks_exact(LANES), k.chunks_exact(LANES));
            let (row_tail, k_tail) = (rows.remainder(), ks.remainder());
            for (c, w) in rows.zip(ks) {
                for i in 0..LANES {
                    let x = if w[i] > 0.0 { c[i] } else { f32::NEG_INFINITY };
                    m[i] = if x > m[i] { x } else { m[i] };
                }
            }
            let tail = row_tail.iter().zip(k_tail).fold(f32::NEG_INFINITY, |m, (&x, &w)| if w > 0.0 { m.max(x) } else { m });
            m.iter().fold(tail, |a, &b| a.max(b))
        }
        None => lane_max(row),
    };
    if !max.is_finite() {
        row.fill(0.0);
        return;
    }
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    if let Some(k) = keep {
        for (x, w) in row.iter_mut().zip(k) {
            *x *= w;
        }
    }
    let inv = 1.0 / lane_sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// The training kernel's forward row (`block_attention_cpu.rs`): softmax of `row` in place,
/// returning its log-sum-exp `max + ln Σ e^(x − max)` for the backward. The same lane-split
/// reductions and vectorisable exp as [`softmax_row`], with the same AVX2 + FMA build.
pub(crate) fn softmax_row_lse(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { softmax_row_lse_avx2(row) };
    }
    softmax_row_lse_portable(row)
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_lse_avx2(row: &mut [f32]) -> f32 {
    softmax_row_lse_portable(row)
}

#[inline(always)]
fn softmax_row_lse_portable(row: &mut [f32]) -> f32 {
    let max = lane_max(row);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let sum = lane_sum(row);
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    max + sum.ln()
}

/// The training kernel's backward rows: `p[i] = e^(p[i] − lse)` (the forward's weights again
/// from the saved log-sum-exp) and a copy into `d`.
pub(crate) fn exp_from_lse(p: &mut [f32], d: &mut [f32], lse: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { exp_from_lse_avx2(p, d, lse) };
    }
    exp_from_lse_portable(p, d, lse)
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_from_lse_avx2(p: &mut [f32], d: &mut [f32], lse: f32) {
    exp_from_lse_portable(p, d, lse)
}

#[inline(always)]
fn exp_from_lse_portable(p: &mut [f32], d: &mut [f32], lse: f32) {
    for (w, d) in p.iter_mut().zip(d.iter_mut()) {
        *w = exp(*w - lse);
        *d = *w;
    }
}

/// The largest of `row` over [`LANES`] fixed lanes, then the tail (−∞ when empty).
#[inline(always)]
fn lane_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let rows = row.chunks_exact(LANES);
    let tail = rows.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in rows {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    m.iter().fold(tail, |a, &b| a.max(b))
}

/// Σ `row` over [`LANES`] fixed lanes, then the tail.
#[inline(always)]
fn lane_sum(row: &[f32]) -> f32 {
    let mut sums = [0.0f32; LANES];
    let rows = row.chunks_exact(LANES);
    let tail: f32 = rows.remainder().iter().sum();
    for c in rows {
        for i in 0..LANES {
            sums[i] += c[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// e^x for x ≤ 0 within 2 ulp (Cephes `expf`: x = n·ln 2 + r, degree-6 polynomial in r,
/// 2ⁿ from the exponent bits), 0 below −87, branch-free so loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let under = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    // floor() by truncation and a select: `f32::floor` is a libm call on the baseline x86-64
    // target (no SSE4.1 `roundps`), which kept this loop scalar (13.6% of `scgpt predict` in
    // `perf`, and the rest of softmax_row unvectorised). |v| < 128 here, so the cast is exact.
    let v = x * LOG2E + 0.5;
    let t = v as i32 as f32;
    let n = if t > v { t - 1.0 } else { t };
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5e-1;
    let y = p * z + r + 1.0;
    let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    // Below −87 (masked scores of −1e30 among them) the result is 0 rather than the clamp's
    // e^−87 (libm: at most 1.6e-38 there), so a masked key keeps exactly zero weight. A
    // select, so the loop still vectorises.
    if under {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::Distribution;

    #[test]
    fn truncation_floor_equals_floor_over_the_range() {
        let mut v = -125.0f32;
        while v <= 128.0 {
            let t = v as i32 as f32;
            assert_eq!(if t > v { t - 1.0 } else { t }, v.floor(), "{v}");
            v += 0.000_731;
        }
    }

    /// The lane-split reductions against a plain softmax, and the AVX2 build of the row
    /// against the portable one (same bits), on every length around the lane count, with and
    /// without masked keys.
    #[test]
    fn softmax_row_paths_agree_with_a_plain_softmax() {
        for n in [1usize, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 513] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 97.0 - 5.0).collect();
            for masked in [false, true] {
                let keep: Vec<f32> = (0..n).map(|i| if masked && i % 3 == 1 { 0.0 } else { 1.0 }).collect();
                let k = masked.then_some(&keep[..]);
                let mut got = row.clone();
                softmax_row_portable(&mut got, k);
                let max = row.iter().zip(&keep).filter(|(_, &w)| w > 0.0).map(|(&x, _)| x).fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = row.iter().zip(&keep).map(|(&x, &w)| if w > 0.0 { ((x - max) as f64).exp() } else { 0.0 }).collect();
                let z: f64 = e.iter().sum();
                for (i, (&g, &w)) in got.iter().zip(&e).enumerate() {
                    assert!((g as f64 - w / z).abs() <= 1e-6, "n {n} masked {masked} i {i}: {g} vs {}", w / z);
                }
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    let mut wide = row.clone();
                    // SAFETY: the features were checked just above.
                    unsafe { softmax_row_avx2(&mut wide, k) };
                    assert_eq!(
                        wide.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 2.5 * f32::EPSILON * want, "exp({x}) = {got}, libm {want}");
            x += 0.001_37;
        }
    }

    #[test]
    fn matches_the_fused_kernel_with_and_without_padding() {
        let device = Device::flex();
        let (b, l, h, dh) = (3, 37, 4, 8);
        let d = h * dh;
        let qkv = Tensor::<3>::random([b, l, 3 * d], Distribution::Normal(0.0, 1.5), &device);
        let mut pad = vec![false; b * l];
        for j in 30..l {
            pad[l + j] = true; // cell 1: the last 7 tokens are padding
        }
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, l]), &device);
        for m in [None, Some(mask)] {
            let got = attention_packed(qkv.clone(), h, m.clone(), &device);
            let split = |i: usize| qkv.clone().slice([0..b, 0..l, i * d..(i + 1) * d]).reshape([b, l, h, dh]).swap_dims(1, 2);
            let fused_mask = m.map(|m| m.unsqueeze_dims::<4>(&[1, 2]).expand([b, h, l, l]));
            let want = attention(split(0), split(1), split(2), fused_mask, None, AttentionModuleOptions::default())
                .swap_dims(1, 2)
                .reshape([b, l, d]);
            let worst: f32 = (got - want).abs().max().into_scalar();
            assert!(worst < 1e-5, "max |diff| {worst}");
        }
    }
}
