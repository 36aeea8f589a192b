//! Attention whose training memory grows with L, not L².
//!
//! Under burn's autodiff every attention keeps its L×L score tensors (softmax output, dropout mask,
//! dropped weights) until the backward. This operation computes in blocks of query rows instead,
//! keeps only the output and the per-row log-sum-exp, and recomputes each block's probabilities in
//! the backward (the FlashAttention recipe, in tensor operations rather than one kernel). Attention
//! dropout multiplies the probabilities by a mask that is a counter hash of (seed, row, column), so
//! the backward regenerates it instead of storing it, and the explicit path draws the very same
//! mask.
//!
//! It is a burn backend extension: the forward and backward are written once on a backend's
//! primitive operations (`Backend` default bodies, so every execution backend gets them), and
//! `Autodiff<B>` carries a hand-written `Backward` that calls them. burn's own
//! `gradient_checkpointing()` works per operation and keeps matmul outputs, so it cannot drop the
//! scores; per-layer recomputation has no API in 0.22.1.
//!
//! One operation serves the three attentions of the model:
//! - the classic encoder and the pcpt stream: each query row attends to the `Lk` keys;
//! - the generative stream: each gen query attends to the pcpt keys *and* its own key
//!   (`k_self`/`v_self`, one per query row), never to other gen tokens.
//!
//! Masking is additive: `key_bias` `[B, 1, 1, Lk]` and `self_bias` `[B, 1, Lq, 1]` hold 0 or
//! [`MASKED_SCORE`], which equals the explicit path's `mask_fill` for any real score.

use std::ops::Range;

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{backend_extension, get_or_init_device_settings, Backend, TensorMetadata};
use burn::tensor::{FloatDType, IntDType, Shape, Slice};

/// Score of a masked key: finite, so a row whose keys are all masked averages them uniformly (as
/// the explicit path does) instead of producing NaN.
pub const MASKED_SCORE: f32 = -1.0e30;

/// What an attention call computes besides its tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockSpec {
    /// `1/√d_head`.
    pub scale: f64,
    /// Attention-dropout probability; 0 turns dropout off.
    pub dropout: f64,
    /// Seed of the dropout mask (see [`keep_mask`]).
    pub seed: u64,
    /// Query rows per block.
    pub block_rows: usize,
    /// Whether each query row also has its own key (`k_self`, `v_self`): the generative stream.
    pub has_self: bool,
}

/// Attention computed in query blocks. Shapes: `q` `[B, H, Lq, dh]`, `k`/`v` `[B, H, Lk, dh]`,
/// `k_self`/`v_self` `[B, H, Lq, dh]` (ignored unless `has_self`; pass any small tensor then),
/// `key_bias` `[B, 1, 1, Lk]`, `self_bias` `[B, 1, Lq, 1]`. Returns `[B, H, Lq, dh]`.
#[backend_extension(
    Flex,
    Cube: cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan")),
    Autodiff,
)]
pub trait BlockAttentionOps: Backend {
    #[allow(clippy::too_many_arguments)]
    fn block_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k_self: FloatTensor<Self>,
        v_self: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        self_bias: FloatTensor<Self>,
        scale: f64,
        dropout: f64,
        seed: u64,
        block_rows: usize,
        has_self: bool,
    ) -> FloatTensor<Self> {
        let spec = BlockSpec { scale, dropout, seed, block_rows, has_self };
        forward::<Self>(&Inputs { q, k, v, k_self, v_self, key_bias, self_bias }, &spec).0
    }

    /// The forward on this backend's primitives: output and per-row log-sum-exp. By default the
    /// generic tensor-operation path; Flex runs a fused kernel (`block_attention_cpu.rs`).
    #[allow(clippy::too_many_arguments)]
    fn block_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k_self: FloatTensor<Self>,
        v_self: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        self_bias: FloatTensor<Self>,
        scale: f64,
        dropout: f64,
        seed: u64,
        block_rows: usize,
        has_self: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let spec = BlockSpec { scale, dropout, seed, block_rows, has_self };
        forward::<Self>(&Inputs { q, k, v, k_self, v_self, key_bias, self_bias }, &spec)
    }

    /// The backward from the saved output and log-sum-exp: gradients of q, k, v and (with an own
    /// key) of k_self and v_self, else those two inputs back unchanged.
    #[allow(clippy::too_many_arguments)]
    fn block_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k_self: FloatTensor<Self>,
        v_self: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        self_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
        dropout: f64,
        seed: u64,
        block_rows: usize,
        has_self: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let spec = BlockSpec { scale, dropout, seed, block_rows, has_self };
        generic_backward::<Self>(Inputs { q, k, v, k_self, v_self, key_bias, self_bias }, &spec, out, lse, grad)
    }

    /// The dropout mask of a whole `[B, H, Lq, Lk]` weight tensor (see [`keep_mask`]), on
    /// `like`'s device and in its float dtype. The explicit path multiplies by it.
    fn attention_keep_mask(like: FloatTensor<Self>, dims: [usize; 4], seed: u64, dropout: f64) -> FloatTensor<Self> {
        Self::block_keep_mask(like, dims, [0, dims[2]], seed, 1.0 - dropout)
    }

    /// Query rows `rows[0]..rows[1]` of that mask. By default integer tensor operations on the
    /// device; Flex fills it on the host's cores (the same values, [`mask_draw`]).
    fn block_keep_mask(like: FloatTensor<Self>, dims: [usize; 4], rows: [usize; 2], seed: u64, keep: f64) -> FloatTensor<Self> {
        keep_mask::<Self>(seed, keep, dims, rows[0]..rows[1], &like.device(), FloatDType::from(like.dtype()))
    }
}

/// The trait's backward tuple: without an own key, k_self and v_self come back unchanged in its
/// last two slots.
type Five<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

fn generic_backward<B: BlockAttentionOps>(
    x: Inputs<B>,
    spec: &BlockSpec,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> Five<B> {
    let (ks, vs) = (x.k_self.clone(), x.v_self.clone());
    let g = backward::<B>(&x, spec, &out, &lse, grad);
    (g.q, g.k, g.v, g.k_self.unwrap_or(ks), g.v_self.unwrap_or(vs))
}

/// Whether the fused Flex kernel takes the call: switched on, f32, and no empty dimension (the
/// generic path handles those).
fn fused_ok(ts: &[&FloatTensor<burn::backend::Flex>]) -> bool {
    crate::block_attention_cpu::fused() && ts.iter().all(|t| t.dtype() == burn::tensor::DType::F32 && t.shape().iter().all(|&n| n > 0))
}

impl BlockAttentionOps for burn::backend::Flex {
    fn block_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k_self: FloatTensor<Self>,
        v_self: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        self_bias: FloatTensor<Self>,
        scale: f64,
        dropout: f64,
        seed: u64,
        block_rows: usize,
        has_self: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let spec = BlockSpec { scale, dropout, seed, block_rows, has_self };
        if fused_ok(&[&q, &k, &v, &k_self, &v_self]) {
            let x = crate::block_attention_cpu::HostInputs::new(q, k, v, k_self, v_self, key_bias, self_bias);
            return crate::block_attention_cpu::forward(&x, &spec);
        }
        forward::<Self>(&Inputs { q, k, v, k_self, v_self, key_bias, self_bias }, &spec)
    }

    fn block_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k_self: FloatTensor<Self>,
        v_self: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        self_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
        dropout: f64,
        seed: u64,
        block_rows: usize,
        has_self: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let spec = BlockSpec { scale, dropout, seed, block_rows, has_self };
        if fused_ok(&[&q, &k, &v, &k_self, &v_self, &grad]) {
            let x = crate::block_attention_cpu::HostInputs::new(q, k, v, k_self, v_self, key_bias, self_bias);
            let [dq, dk, dv, dks, dvs] = crate::block_attention_cpu::backward(&x, &spec, out, lse, grad);
            return (dq, dk, dv, dks, dvs);
        }
        generic_backward::<Self>(Inputs { q, k, v, k_self, v_self, key_bias, self_bias }, &spec, out, lse, grad)
    }

    fn block_keep_mask(like: FloatTensor<Self>, dims: [usize; 4], rows: [usize; 2], seed: u64, keep: f64) -> FloatTensor<Self> {
        use burn::tensor::{DType, TensorData};
        use rayon::prelude::*;
        let device = like.device();
        if like.dtype() != DType::F32 {
            return keep_mask::<Self>(seed, keep, dims, rows[0]..rows[1], &device, FloatDType::from(like.dtype()));
        }
        let [b, h, lq, lk] = dims;
        let n = rows[1] - rows[0];
        let threshold = keep_threshold(keep);
        let scale = (1.0 / keep) as f32;
        let mut mask = vec![0f32; b * h * n * lk];
        // One chunk per (head, query row): row = (b·H + h)·Lq + i.
        mask.par_chunks_mut(lk.max(1)).enumerate().for_each(|(r, out)| {
            let (bh, i) = (r / n, rows[0] + r % n);
            let a = hash32_row(seed, (bh * lq + i) as u64);
            for (j, m) in out.iter_mut().enumerate() {
                *m = if mask_column(seed, a, j as u64) < threshold { scale } else { 0.0 };
            }
        });
        <Self as burn::backend::ops::FloatTensorOps<Self>>::float_from_data(TensorData::new(mask, [b, h, n, lk]), &device)
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
impl BlockAttentionOps for burn::backend::Cube {}

/// The tensors of one call.
#[derive(Clone, Debug)]
pub(crate) struct Inputs<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub k_self: FloatTensor<B>,
    pub v_self: FloatTensor<B>,
    pub key_bias: FloatTensor<B>,
    pub self_bias: FloatTensor<B>,
}

/// Gradients of one call, `None` for the self key/value when there is none.
pub(crate) struct Grads<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub k_self: Option<FloatTensor<B>>,
    pub v_self: Option<FloatTensor<B>>,
}

fn rows4(t: &Shape, rows: &Range<usize>) -> Vec<Slice> {
    vec![Slice::from(0..t[0]), Slice::from(0..t[1]), Slice::from(rows.clone()), Slice::from(0..t[3])]
}

fn cols4(t: &Shape, cols: Range<usize>) -> Vec<Slice> {
    vec![Slice::from(0..t[0]), Slice::from(0..t[1]), Slice::from(0..t[2]), Slice::from(cols)]
}

/// Rows `rows` of a `[B, H|1, L, X]` tensor.
fn slice_rows<B: Backend>(t: &FloatTensor<B>, rows: &Range<usize>) -> FloatTensor<B> {
    B::float_slice(t.clone(), &rows4(&t.shape(), rows))
}

/// `t` `[.., .., n, 1]` broadcast along the last dim to `to`.
fn widen<B: Backend>(t: FloatTensor<B>, to: &Shape) -> FloatTensor<B> {
    B::float_expand(t, to.clone())
}

/// One block's scores and probabilities: `(scores [B, H, n, Lk (+1)])`. The self key, when there
/// is one, is the last column.
fn block_scores<B: Backend>(x: &Inputs<B>, spec: &BlockSpec, rows: &Range<usize>) -> FloatTensor<B> {
    let qb = slice_rows::<B>(&x.q, rows);
    let [b, h, n, _] = dims4(&qb.shape());
    let lk = x.k.shape()[2];
    let scores = B::float_mul_scalar(B::float_matmul(qb.clone(), B::float_swap_dims(x.k.clone(), 2, 3)), spec.scale.into());
    let scores = B::float_add(scores, B::float_expand(x.key_bias.clone(), Shape::new([b, h, n, lk])));
    if !spec.has_self {
        return scores;
    }
    let ksb = slice_rows::<B>(&x.k_self, rows);
    let own = B::float_mul_scalar(B::float_sum_dim(B::float_mul(qb, ksb), 3), spec.scale.into());
    let own = B::float_add(own, B::float_expand(slice_rows::<B>(&x.self_bias, rows), Shape::new([b, h, n, 1])));
    B::float_cat(vec![scores, own], 3)
}

fn dims4(s: &Shape) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

/// The row blocks of `lq` query rows.
fn blocks(lq: usize, block_rows: usize) -> impl Iterator<Item = Range<usize>> {
    let step = block_rows.max(1);
    (0..lq).step_by(step).map(move |i| i..(i + step).min(lq))
}

/// `weights [B, H, n, Lk (+1)] → weights · [V; v_self]` for the block's rows.
fn weighted_values<B: Backend>(x: &Inputs<B>, spec: &BlockSpec, rows: &Range<usize>, w: FloatTensor<B>) -> FloatTensor<B> {
    let shape = w.shape();
    let lk = x.k.shape()[2];
    if !spec.has_self {
        return B::float_matmul(w, x.v.clone());
    }
    let to_keys = B::float_slice(w.clone(), &cols4(&shape, 0..lk));
    let to_self = B::float_slice(w, &cols4(&shape, lk..lk + 1));
    let vsb = slice_rows::<B>(&x.v_self, rows);
    let vshape = vsb.shape();
    B::float_add(B::float_matmul(to_keys, x.v.clone()), B::float_mul(widen::<B>(to_self, &vshape), vsb))
}

/// The block's dropout mask (`1/keep` or 0), or `None` without dropout.
fn block_mask<B: BlockAttentionOps>(x: &Inputs<B>, spec: &BlockSpec, rows: &Range<usize>, like: &FloatTensor<B>) -> Option<FloatTensor<B>> {
    if spec.dropout <= 0.0 {
        return None;
    }
    let [b, h, lq, _] = dims4(&x.q.shape());
    let cols = x.k.shape()[2] + spec.has_self as usize;
    Some(B::block_keep_mask(like.clone(), [b, h, lq, cols], [rows.start, rows.end], spec.seed, 1.0 - spec.dropout))
}

/// Forward: the output `[B, H, Lq, dh]` and the per-row log-sum-exp `[B, H, Lq, 1]`.
pub(crate) fn forward<B: BlockAttentionOps>(x: &Inputs<B>, spec: &BlockSpec) -> (FloatTensor<B>, FloatTensor<B>) {
    let lq = x.q.shape()[2];
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for rows in blocks(lq, spec.block_rows) {
        let scores = block_scores::<B>(x, spec, &rows);
        let max = B::float_max_dim(scores.clone(), 3);
        let shape = scores.shape();
        let e = B::float_exp(B::float_sub(scores, widen::<B>(max.clone(), &shape)));
        let sum = B::float_sum_dim(e.clone(), 3);
        let mut w = B::float_div(e, widen::<B>(sum.clone(), &shape));
        if let Some(mask) = block_mask::<B>(x, spec, &rows, &w) {
            w = B::float_mul(w, mask);
        }
        outs.push(weighted_values::<B>(x, spec, &rows, w));
        lses.push(B::float_add(max, B::float_log(sum)));
    }
    (B::float_cat(outs, 2), B::float_cat(lses, 2))
}

/// Backward from the forward's output `out` and log-sum-exp `lse` and the output's gradient.
pub(crate) fn backward<B: BlockAttentionOps>(
    x: &Inputs<B>,
    spec: &BlockSpec,
    out: &FloatTensor<B>,
    lse: &FloatTensor<B>,
    grad: FloatTensor<B>,
) -> Grads<B> {
    let [_, _, lq, _] = dims4(&x.q.shape());
    let lk = x.k.shape()[2];
    let mut dk = B::float_zeros(x.k.shape(), &x.k.device(), FloatDType::from(x.k.dtype()));
    let mut dv = B::float_zeros(x.v.shape(), &x.v.device(), FloatDType::from(x.v.dtype()));
    let (mut dqs, mut dkss, mut dvss) = (Vec::new(), Vec::new(), Vec::new());
    for rows in blocks(lq, spec.block_rows) {
        let scores = block_scores::<B>(x, spec, &rows);
        let shape = scores.shape();
        // The forward's probabilities, from the saved log-sum-exp.
        let p = B::float_exp(B::float_sub(scores, widen::<B>(slice_rows::<B>(lse, &rows), &shape)));
        let mask = block_mask::<B>(x, spec, &rows, &p);
        let dropped = match &mask {
            Some(m) => B::float_mul(p.clone(), m.clone()),
            None => p.clone(),
        };
        let g = slice_rows::<B>(&grad, &rows);
        let qb = slice_rows::<B>(&x.q, &rows);
        let gshape = g.shape();
        // d(weights after dropout): towards the keys, then (last column) the own value.
        let to_keys_w = if spec.has_self { B::float_slice(dropped.clone(), &cols4(&shape, 0..lk)) } else { dropped.clone() };
        dv = B::float_add(dv, B::float_matmul(B::float_swap_dims(to_keys_w, 2, 3), g.clone()));
        let mut d_dropped = B::float_matmul(g.clone(), B::float_swap_dims(x.v.clone(), 2, 3));
        if spec.has_self {
            let vsb = slice_rows::<B>(&x.v_self, &rows);
            let w_self = B::float_slice(dropped, &cols4(&shape, lk..lk + 1));
            dvss.push(B::float_mul(widen::<B>(w_self, &gshape), g.clone()));
            let d_self = B::float_sum_dim(B::float_mul(g.clone(), vsb), 3);
            d_dropped = B::float_cat(vec![d_dropped, d_self], 3);
        }
        let d_p = match mask {
            Some(m) => B::float_mul(d_dropped, m),
            None => d_dropped,
        };
        // Σ_j P_ij dP_ij = dO_i · O_i, dropout or not.
        let row_dot = B::float_sum_dim(B::float_mul(g, slice_rows::<B>(out, &rows)), 3);
        let d_scores = B::float_mul(p, B::float_sub(d_p, widen::<B>(row_dot, &shape)));
        let d_scores = B::float_mul_scalar(d_scores, spec.scale.into());
        let ds_keys = if spec.has_self { B::float_slice(d_scores.clone(), &cols4(&shape, 0..lk)) } else { d_scores.clone() };
        let mut dq = B::float_matmul(ds_keys.clone(), x.k.clone());
        dk = B::float_add(dk, B::float_matmul(B::float_swap_dims(ds_keys, 2, 3), qb.clone()));
        if spec.has_self {
            let ds_self = widen::<B>(B::float_slice(d_scores, &cols4(&shape, lk..lk + 1)), &gshape);
            dq = B::float_add(dq, B::float_mul(ds_self.clone(), slice_rows::<B>(&x.k_self, &rows)));
            dkss.push(B::float_mul(ds_self, qb));
        }
        dqs.push(dq);
    }
    Grads {
        q: B::float_cat(dqs, 2),
        k: dk,
        v: dv,
        k_self: spec.has_self.then(|| B::float_cat(dkss, 2)),
        v_self: spec.has_self.then(|| B::float_cat(dvss, 2)),
    }
}

// ---------------------------------------------------------------------------------------------
// The dropout mask: a counter hash evaluated with integer tensor operations.

const MASK32: i64 = 0xFFFF_FFFF;
/// Multipliers below 2³¹, so that a 32-bit value times one stays below 2⁶³ in `i64` on every
/// backend (no overflow, no reliance on wrapping).
const MUL_A: i64 = 0x7FEB_352D;
const MUL_B: i64 = 0x2C1B_3C6D;
const MUL_COL: i64 = 0x61C8_8647;

/// The 32-bit hash of the mask: xorshift-multiply rounds.
pub fn hash32(mut x: u64) -> u64 {
    x &= MASK32 as u64;
    x ^= x >> 16;
    x = (x * MUL_A as u64) & MASK32 as u64;
    x ^= x >> 15;
    x = (x * MUL_B as u64) & MASK32 as u64;
    x ^ (x >> 16)
}

fn seed_halves(seed: u64) -> (u64, u64) {
    (seed & MASK32 as u64, seed >> 32)
}

/// The uniform 32-bit draw of element `(row, col)` where `row = (b·H + h)·Lq + i`.
pub fn mask_draw(seed: u64, row: u64, col: u64) -> u64 {
    mask_column(seed, hash32_row(seed, row), col)
}

/// The part of [`mask_draw`] that depends on the row only.
pub(crate) fn hash32_row(seed: u64, row: u64) -> u64 {
    hash32(row ^ seed_halves(seed).0)
}

/// [`mask_draw`] from the row's hash.
pub(crate) fn mask_column(seed: u64, row_hash: u64, col: u64) -> u64 {
    hash32(((row_hash + col * MUL_COL as u64) & MASK32 as u64) ^ seed_halves(seed).1)
}

/// The keep threshold of a 32-bit draw for keep probability `keep`.
pub fn keep_threshold(keep: f64) -> u64 {
    (keep * 4_294_967_296.0) as u64
}

/// Rows `rows` of the mask of a `dims` weight tensor by integer tensor operations on `like`'s
/// device, whatever the backend's own [`BlockAttentionOps::block_keep_mask`] (Flex fills it on
/// the host): what GPU backends run, testable on the CPU.
pub fn keep_mask_by_tensor_ops(
    like: &burn::tensor::Tensor<1>,
    dims: [usize; 4],
    rows: Range<usize>,
    seed: u64,
    keep: f64,
) -> burn::tensor::Tensor<4> {
    use burn::backend::Dispatch;
    let t = like.clone().into_dispatch();
    let device = t.device();
    let dtype = FloatDType::from(t.dtype());
    burn::tensor::Tensor::from_dispatch(keep_mask::<Dispatch>(seed, keep, dims, rows, &device, dtype))
}

fn hash32_tensor<B: Backend>(x: IntTensor<B>) -> IntTensor<B> {
    let shift = |x: IntTensor<B>, n: i64| B::bitwise_xor(x.clone(), B::bitwise_right_shift_scalar(x, n.into()));
    let x = shift(x, 16);
    let x = B::bitwise_and_scalar(B::int_mul_scalar(x, MUL_A.into()), MASK32.into());
    let x = shift(x, 15);
    let x = B::bitwise_and_scalar(B::int_mul_scalar(x, MUL_B.into()), MASK32.into());
    shift(x, 16)
}

/// Rows `rows` of the `[B, H, Lq, Lk]` dropout mask with seed `seed`: element `(b, h, i, j)` is
/// `1/keep` when [`mask_draw`]`(seed, (b·H + h)·Lq + i, j)` is below [`keep_threshold`], else 0. It
/// depends on the element's coordinates only, so any block of rows regenerates its part exactly.
pub fn keep_mask<B: Backend>(
    seed: u64,
    keep: f64,
    dims: [usize; 4],
    rows: Range<usize>,
    device: &B::Device,
    dtype: FloatDType,
) -> FloatTensor<B> {
    let [b, h, lq, lk] = dims;
    let n = rows.len();
    let (s0, s1) = seed_halves(seed);
    let i64s = IntDType::I64;
    let heads =
        B::int_mul_scalar(B::int_reshape(B::int_arange(0..(b * h) as i64, device, i64s), Shape::new([b, h, 1, 1])), (lq as i64).into());
    let within = B::int_reshape(B::int_arange(rows.start as i64..rows.end as i64, device, i64s), Shape::new([1, 1, n, 1]));
    let row = B::int_add(B::int_expand(heads, Shape::new([b, h, n, 1])), B::int_expand(within, Shape::new([b, h, n, 1])));
    let row = B::bitwise_and_scalar(row, MASK32.into());
    let a = hash32_tensor::<B>(B::bitwise_xor_scalar(row, (s0 as i64).into()));
    let col = B::int_mul_scalar(B::int_reshape(B::int_arange(0..lk as i64, device, i64s), Shape::new([1, 1, 1, lk])), MUL_COL.into());
    let full = Shape::new([b, h, n, lk]);
    let x = B::int_add(B::int_expand(a, full.clone()), B::int_expand(col, full));
    let x = B::bitwise_xor_scalar(B::bitwise_and_scalar(x, MASK32.into()), (s1 as i64).into());
    let draw = hash32_tensor::<B>(x);
    let bool_dtype = get_or_init_device_settings::<B>(device).bool_dtype;
    let kept: BoolTensor<B> = B::int_lower_elem(draw, (keep_threshold(keep) as i64).into(), bool_dtype);
    B::float_mul_scalar(B::bool_into_float(kept, dtype), (1.0 / keep).into())
}

// ---------------------------------------------------------------------------------------------
// Autodiff: the hand-written backward.

mod autodiff {
    use super::*;
    use burn_autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn_autodiff::grads::Gradients;
    use burn_autodiff::ops::{Backward, Ops, OpsKind};
    use burn_autodiff::Autodiff;

    #[derive(Debug)]
    struct BlockAttentionBackward;

    #[derive(Clone, Debug)]
    struct Saved<B: Backend> {
        inputs: Inputs<B>,
        spec: BlockSpec,
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
    }

    impl<B: BlockAttentionOps> Backward<B, 5> for BlockAttentionBackward {
        type State = Saved<B>;

        fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let s = ops.state;
            let (x, p) = (s.inputs, s.spec);
            let (dq, dk, dv, dks, dvs) = B::block_attention_backward(
                x.q,
                x.k,
                x.v,
                x.k_self,
                x.v_self,
                x.key_bias,
                x.self_bias,
                s.out,
                s.lse,
                grad,
                p.scale,
                p.dropout,
                p.seed,
                p.block_rows,
                p.has_self,
            );
            let own = |g| p.has_self.then_some(g);
            let [q, k, v, k_self, v_self] = ops.parents;
            for (node, grad) in [(q, Some(dq)), (k, Some(dk)), (v, Some(dv)), (k_self, own(dks)), (v_self, own(dvs))] {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    impl<B: BlockAttentionOps, C: CheckpointStrategy> BlockAttentionOps for Autodiff<B, C> {
        fn block_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            k_self: FloatTensor<Self>,
            v_self: FloatTensor<Self>,
            key_bias: FloatTensor<Self>,
            self_bias: FloatTensor<Self>,
            scale: f64,
            dropout: f64,
            seed: u64,
            block_rows: usize,
            has_self: bool,
        ) -> FloatTensor<Self> {
            let spec = BlockSpec { scale, dropout, seed, block_rows, has_self };
            let guards = [q.node(), k.node(), v.node(), k_self.node(), v_self.node()];
            let inputs = Inputs {
                q: q.into_primitive(),
                k: k.into_primitive(),
                v: v.into_primitive(),
                k_self: k_self.into_primitive(),
                v_self: v_self.into_primitive(),
                key_bias: key_bias.into_primitive(),
                self_bias: self_bias.into_primitive(),
            };
            let x = inputs.clone();
            let (out, lse) = B::block_attention_forward(
                x.q,
                x.k,
                x.v,
                x.k_self,
                x.v_self,
                x.key_bias,
                x.self_bias,
                scale,
                dropout,
                seed,
                block_rows,
                has_self,
            );
            match <BlockAttentionBackward as Backward<B, 5>>::prepare::<C>(BlockAttentionBackward, guards).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(Saved { inputs, spec, out: out.clone(), lse }, out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            }
        }

        fn block_keep_mask(like: FloatTensor<Self>, dims: [usize; 4], rows: [usize; 2], seed: u64, keep: f64) -> FloatTensor<Self> {
            // The inner backend's mask, as a constant of the graph.
            <Self as burn::backend::AutodiffBackend>::from_inner(B::block_keep_mask(like.into_primitive(), dims, rows, seed, keep))
        }
    }
}
