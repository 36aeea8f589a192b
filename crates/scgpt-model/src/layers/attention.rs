//! The attention block of an encoder layer: the classic stream and the generative streams.

use burn::backend::Dispatch;
use burn::module::Module;
use burn::nn::{Dropout, Linear};
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Distribution, Tensor};

use super::*;
use crate::block_attention::{BlockAttentionOps, MASKED_SCORE};

/// The attention block of a layer: the flash-attn `FlashMHA` layout, `Wqkv` = Linear(d, 3d)
/// whose output features are [Q | K | V], each split into heads of `d/nhead` contiguous
/// features (identical to PyTorch's `in_proj_weight`), then `out_proj`.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub Wqkv: Linear,
    pub out_proj: Linear,
    /// Dropout on the attention weights (`attention_dropout` = the model's dropout).
    pub dropout: Dropout,
    pub nhead: usize,
    /// Query rows per block of the blockwise training attention (`block_attention.rs`); 0 keeps
    /// the explicit path, whose autodiff graph holds the L×L scores.
    pub block_rows: usize,
}

/// Which attention computes training steps (`run.attention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMode {
    /// Scores, softmax and dropout as whole `[B, H, L, L]` tensors under autodiff: the reference
    /// path, memory quadratic in the cell length.
    Explicit,
    /// Query blocks of this many rows, probabilities recomputed in the backward: memory linear in
    /// the cell length (and, on Flex, a fused kernel faster than explicit at long cells).
    Blockwise { block_rows: usize },
}

impl AttentionMode {
    /// Rows per query block when `run.attention = "blockwise"` names none.
    pub const DEFAULT_BLOCK_ROWS: usize = 128;

    fn block_rows(self) -> usize {
        match self {
            AttentionMode::Explicit => 0,
            AttentionMode::Blockwise { block_rows } => block_rows.max(1),
        }
    }
}

/// Draws the seed of one attention call's dropout mask from burn's seeded RNG, so `Device::seed`
/// fixes every mask; both attention paths draw it the same way and so drop the same weights.
fn attention_dropout_seed(device: &Device) -> u64 {
    let plain = device.clone().inner();
    // f32 whatever the device's default (a bf16 draw would keep 8 bits of each).
    let draws = Tensor::<1>::random([4], Distribution::Uniform(0.0, 65_536.0), (&plain, DType::F32));
    let draws: Vec<f32> = draws.into_data().convert::<f32>().try_to_vec().expect("f32 draws");
    draws.iter().fold(0u64, |acc, &d| (acc << 16) | (d as u64 & 0xFFFF))
}

/// `[B, L]` padding (true = pad) → additive scores `[B, L]` of 0 or [`MASKED_SCORE`] in `like`'s
/// float type; all zeros without a mask.
fn score_bias(mask: Option<Tensor<2, Bool>>, b: usize, l: usize, like: &Tensor<4>) -> Tensor<2> {
    let device = like.device();
    match mask {
        Some(m) => m.float().mul_scalar(MASKED_SCORE as f64),
        None => Tensor::<2>::zeros([b, l], &device),
    }
    .cast(like.dtype())
}

impl SelfAttention {
    pub fn new(d: usize, nhead: usize, p: f64, device: &Device) -> Self {
        Self { Wqkv: linear(d, 3 * d, true, device), out_proj: linear(d, d, true, device), dropout: dropout(p), nhead, block_rows: 0 }
    }

    /// The same block computing training steps with `mode`.
    pub fn with_attention(mut self, mode: AttentionMode) -> Self {
        self.block_rows = mode.block_rows();
        self
    }

    /// True when this call should take the blockwise path: training (autodiff) with it selected.
    fn blockwise(&self, q: &Tensor<4>) -> bool {
        self.block_rows > 0 && q.device().is_autodiff()
    }

    /// The dropout probability and mask seed of this call, when attention dropout is active.
    fn dropout_draw(&self, x: &Tensor<4>) -> Option<(f64, u64)> {
        dropout_active(&self.dropout, x).then(|| (self.dropout.prob, attention_dropout_seed(&x.device())))
    }

    /// The blockwise training attention (`block_attention.rs`). `key_pad` `[B, Lk]`; `own`: each
    /// query row's own key and value and their padding `[B, Lq]` (the generative stream).
    fn attend_blockwise(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        key_pad: Option<Tensor<2, Bool>>,
        own: Option<(Tensor<4>, Tensor<4>, Option<Tensor<2, Bool>>)>,
    ) -> Tensor<4> {
        let [b, _, lq, dh] = q.dims();
        let lk = k.dims()[2];
        if lq == 0 {
            // No queries (a batch without gen tokens): the empty output has q's shape.
            return q;
        }
        let key_bias = score_bias(key_pad, b, lk, &q).reshape([b, 1, 1, lk]);
        let (has_self, k_self, v_self, self_bias) = match own {
            Some((ks, vs, pad)) => (true, ks, vs, score_bias(pad, b, lq, &q).reshape([b, 1, lq, 1])),
            None => {
                let none = Tensor::<4>::zeros([1, 1, 1, 1], &q.device()).cast(q.dtype());
                (false, none.clone(), none.clone(), none)
            }
        };
        let (p, seed) = self.dropout_draw(&q).unwrap_or((0.0, 0));
        Tensor::from_dispatch(Dispatch::block_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            k_self.into_dispatch(),
            v_self.into_dispatch(),
            key_bias.into_dispatch(),
            self_bias.into_dispatch(),
            1.0 / (dh as f64).sqrt(),
            p,
            seed,
            self.block_rows,
            has_self,
        ))
    }

    /// `weights` `[B, H, Lq, Lk]` after attention dropout, the mask the blockwise path regenerates.
    fn drop_weights(&self, weights: Tensor<4>) -> Tensor<4> {
        let Some((p, seed)) = self.dropout_draw(&weights) else {
            return weights;
        };
        let dims = weights.dims();
        let mask = Tensor::<4>::from_dispatch(Dispatch::attention_keep_mask(weights.clone().detach().into_dispatch(), dims, seed, p));
        weights * mask
    }

    /// `[B, L, 3d]` packed projections → three `[B, H, L, d/H]` tensors.
    pub fn split_heads(&self, qkv: Tensor<3>) -> [Tensor<4>; 3] {
        let [b, l, d3] = qkv.dims();
        let d = d3 / 3;
        let h = self.nhead;
        let mut parts = qkv.chunk(3, 2).into_iter().map(|t| t.reshape([b, l, h, d / h]).swap_dims(1, 2));
        [parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap()]
    }

    /// `[B, H, L, dh]` → `[B, L, H·dh]`.
    pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
        let [b, h, l, dh] = x.dims();
        x.swap_dims(1, 2).reshape([b, l, h * dh])
    }

    /// Scaled dot-product attention with a boolean mask (`true` = may not attend), broadcast
    /// to `[B, H, Lq, Lk]`, and dropout on the weights when training.
    pub fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<4, Bool>>) -> Tensor<4> {
        let [b, h, lq, dh] = q.dims();
        let lk = k.dims()[2];
        if !dropout_active(&self.dropout, &q) {
            // Inference: the fused kernel (no dropout support, no L×L autodiff graph). Flex's
            // kernel broadcasts a [B, 1, Lq, Lk] mask over heads without copying it; expanding to
            // all heads would materialise H times the mask (737 MB a layer at 64 × 1,200
            // tokens). Autodiff devices fall back to a mask_fill that wants the full shape.
            let autodiff = q.device().is_autodiff();
            let mask = mask.map(|m| {
                let heads = if autodiff || m.dims()[1] != 1 { h } else { 1 };
                m.expand([b, heads, lq, lk])
            });
            return attention(q, k, v, mask, None, AttentionModuleOptions::default());
        }
        let mask = mask.map(|m| m.expand([b, h, lq, lk]));
        self.attend_explicit(q, k, v, mask, dh)
    }

    /// The unfused path: softmax(QKᵀ/√dh) with masking, then dropout on the weights, as
    /// PyTorch's MHA and flash-attn do in training.
    pub(crate) fn attend_explicit(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<4, Bool>>, dh: usize) -> Tensor<4> {
        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (dh as f64).sqrt());
        if let Some(m) = mask {
            scores = scores.mask_fill(m, MASKED_SCORE);
        }
        self.drop_weights(softmax(scores, 3)).matmul(v)
    }

    /// Standard self-attention over one sequence. `key_padding_mask`: `[B, L]`, true = pad.
    pub fn forward(&self, x: Tensor<3>, key_padding_mask: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let device = x.device();
        let qkv = self.Wqkv.forward(x);
        if !dropout_active(&self.dropout, &qkv) && !device.is_autodiff() && device == Device::flex() && qkv.dtype() == DType::F32 {
            // Inference on the CPU: our kernel on the packed projections (cpu_attention.rs).
            let ctx = crate::cpu_attention::attention_packed(qkv, self.nhead, key_padding_mask, &device);
            return self.out_proj.forward(ctx);
        }
        let [q, k, v] = self.split_heads(qkv);
        if self.blockwise(&q) {
            return self.out_proj.forward(Self::merge_heads(self.attend_blockwise(q, k, v, key_padding_mask, None)));
        }
        let mask = key_padding_mask.map(|m| m.unsqueeze_dims::<4>(&[1, 2]));
        self.out_proj.forward(Self::merge_heads(self.attend(q, k, v, mask)))
    }
}

impl SelfAttention {
    /// The `dev-temp` pretraining attention (`FlashscGPTMHA`), one shared `Wqkv`:
    /// - pcpt tokens attend among themselves only (key padding from `pcpt_mask`), then
    ///   `out_proj`;
    /// - each gen token attends to every pcpt key plus its own key, never to other gen tokens,
    ///   through identity in/out projections, so its context does **not** go through
    ///   `out_proj`. That is how the checkpoints were trained.
    ///
    /// Masks are `[B, P]` / `[B, G]`, true = padding. Returns (pcpt context, gen context).
    pub fn forward_generative(
        &self,
        pcpt: Tensor<3>,
        gen: Tensor<3>,
        pcpt_mask: Option<Tensor<2, Bool>>,
        gen_mask: Option<Tensor<2, Bool>>,
    ) -> (Tensor<3>, Tensor<3>) {
        let [pq, pk, pv] = self.split_heads(self.Wqkv.forward(pcpt));
        if self.blockwise(&pq) {
            let pcpt_ctx = self.attend_blockwise(pq, pk.clone(), pv.clone(), pcpt_mask.clone(), None);
            let pcpt_ctx = self.out_proj.forward(Self::merge_heads(pcpt_ctx));
            let [gq, gk, gv] = self.split_heads(self.Wqkv.forward(gen));
            let gen_ctx = self.attend_blockwise(gq, pk, pv, pcpt_mask, Some((gk, gv, gen_mask)));
            return (pcpt_ctx, Self::merge_heads(gen_ctx));
        }
        let pcpt_self_mask = pcpt_mask.clone().map(|m| m.unsqueeze_dims::<4>(&[1, 2]));
        let pcpt_ctx = self.out_proj.forward(Self::merge_heads(self.attend(pq, pk.clone(), pv.clone(), pcpt_self_mask)));

        let [gq, gk, gv] = self.split_heads(self.Wqkv.forward(gen));
        let [b, h, g, dh] = gq.dims();
        let p = pk.dims()[2];
        let scale = 1.0 / (dh as f64).sqrt();
        // The gen block of the original's [G, P + G] mask is all "blocked" except its diagonal,
        // so each gen query's keys are the P pcpt keys plus its own: scores [G, P] and one
        // score per query (q·k of the token itself) instead of a [G, P + G] matrix. Blocked
        // entries have zero weight after the softmax either way, so the result is the same.
        let mut to_pcpt = gq.clone().matmul(pk.swap_dims(2, 3)).mul_scalar(scale);
        if let Some(m) = pcpt_mask {
            to_pcpt = to_pcpt.mask_fill(m.unsqueeze_dims::<4>(&[1, 2]).expand([b, h, g, p]), MASKED_SCORE);
        }
        let mut to_self = (gq * gk).sum_dim(3).mul_scalar(scale);
        if let Some(m) = gen_mask {
            // A padded gen token's own key is padding too.
            to_self = to_self.mask_fill(m.unsqueeze_dims::<4>(&[1, 3]).expand([b, h, g, 1]), MASKED_SCORE);
        }
        let weights = self.drop_weights(softmax(Tensor::cat(vec![to_pcpt, to_self], 3), 3));
        let w_pcpt = weights.clone().slice([0..b, 0..h, 0..g, 0..p]);
        let w_self = weights.slice([0..b, 0..h, 0..g, p..p + 1]);
        let gen_ctx = Self::merge_heads(w_pcpt.matmul(pv) + w_self * gv);
        (pcpt_ctx, gen_ctx)
    }
}
