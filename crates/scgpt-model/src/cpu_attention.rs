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
                gemm(l, l, dh, scores.as_mut_ptr(), 1, l as isize, false, q, 1, rs, k, rs, 1, 0.0, scale, false, false, false, Parallelism::None);
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
            unsafe {
                let o = out_ptr.get().add(cell * l * d + head * dh);
                gemm(l, dh, l, o, 1, d as isize, false, scores.as_ptr(), 1, l as isize, v, 1, rs, 0.0, 1.0, false, false, false, Parallelism::None);
            }
        },
    );
    Tensor::from_data(TensorData::new(out, [b, l, d]), device)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// In-place softmax of one score row; keys with `keep = 0` get weight exactly 0 (as the
/// original's `-inf` fill). A row with every key masked is left at 0.
fn softmax_row(row: &mut [f32], keep: Option<&[f32]>) {
    let max = match keep {
        Some(k) => row.iter().zip(k).fold(f32::NEG_INFINITY, |m, (&x, &w)| if w > 0.0 { m.max(x) } else { m }),
        None => row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)),
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
    let inv = 1.0 / row.iter().sum::<f32>();
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// e^x for x ≤ 0 within 2 ulp (Cephes `expf`: x = n·ln 2 + r, degree-6 polynomial in r,
/// 2ⁿ from the exponent bits), branch-free so loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // floor() by truncation and a select: `f32::floor` is a libm call on the baseline x86-64
    // target (no SSE4.1 `roundps`), which kept this loop scalar (13.6% of `scgpt predict` in
    // `perf`, and the rest of softmax_row unvectorised). |v| < 128 here, so the cast is exact.
    let v = x * LOG2E + 0.5;
    let t = v as i32 as f32;
    let n = if t > v { t - 1.0 } else { t };
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5.000_000_1e-1;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
