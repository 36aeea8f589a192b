//! The building blocks of the original `TransformerModel`, with field names equal to the
//! PyTorch attribute names so a state_dict maps onto them by name.
//!
//! Two naming facts the loader relies on:
//! - burn's `Linear` stores its weight as `[in, out]`; burn-store's `PyTorchToBurnAdapter`
//!   transposes every tensor that sits directly in a `Linear`, and renames `weight`/`bias` to
//!   `gamma`/`beta` inside a `LayerNorm`.
//! - PyTorch `nn.Sequential`/`ModuleList` number their children including parameter-free ones
//!   (ReLU, LeakyReLU). Here those containers are `Vec`s of the parameter-holding children only,
//!   and the loader maps the PyTorch index onto the `Vec` index (see `load.rs`).
#![allow(non_snake_case)] // `Wqkv`, `W`, `W_zero_logit` are the checkpoint's names.

use burn::module::{Flag, Module, Param, RunningState};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::tensor::activation::{leaky_relu, relu, sigmoid, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData};

/// PyTorch's `nn.LayerNorm` default, used everywhere in scGPT.
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// The original's DSBN / BatchNorm epsilon (chosen there so fp16 does not underflow).
pub const BATCH_NORM_EPS: f64 = 6.1e-5;
/// `nn.LeakyReLU()` default slope, used by `ExprDecoder` and `AdversarialDiscriminator`.
pub const LEAKY_SLOPE: f64 = 0.01;
/// `ContinuousValueEncoder.max_value`.
pub const VALUE_CLAMP_MAX: f64 = 512.0;

pub(crate) fn layer_norm(d: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d)
        .with_epsilon(LAYER_NORM_EPS)
        .init(device)
}

/// `nn.Linear` with PyTorch's default init (kaiming-uniform a=√5 for the weight, which is
/// burn's default, and U(±1/√fan_in) for the bias, which burn's default also gives).
pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

fn dropout(p: f64) -> Dropout {
    DropoutConfig::new(p).init()
}

/// True when a burn `Dropout` would actually drop on this input: burn only drops on an
/// autodiff device with the module's training flag on (`Module::valid` turns it off).
pub(crate) fn dropout_active<const D: usize>(d: &Dropout, x: &Tensor<D>) -> bool {
    d.prob > 0.0 && d.training.is_enabled() && x.device().is_autodiff()
}

/// `Dropout::forward` with the same semantics (inverted dropout, only on an autodiff device in
/// training mode), as one multiply by a `keep / (1 − p)` mask.
///
/// On Flex the mask is a counter-based hash of (key, element index) filled on all cores: Flex
/// draws every element of `random_like` from one ChaCha12 behind a global lock, which was about
/// 15% of a CPU training step. The key is drawn from burn's seeded RNG, so `Device::seed` still
/// fixes every mask, whatever the thread count. Other devices draw the mask on the device.
pub(crate) fn apply_dropout<const D: usize>(d: &Dropout, x: Tensor<D>) -> Tensor<D> {
    if !dropout_active(d, &x) {
        return x;
    }
    let device = x.device();
    let plain = device.clone().inner();
    if plain != Device::flex() || x.dtype() != DType::F32 {
        return d.forward(x);
    }
    let keep = 1.0 - d.prob;
    let draws = Tensor::<1>::random([2], Distribution::Uniform(0.0, 16_777_216.0), &plain);
    let draws: Vec<f32> = draws.into_data().try_to_vec().expect("f32 draws");
    let key = mix64(((draws[0] as u64) << 24) ^ draws[1] as u64 ^ 0xD209_0E7A);
    let shape = x.shape();
    let mask = dropout_mask(key, shape.num_elements(), keep);
    x * Tensor::from_data(TensorData::new(mask, shape), &device)
}

/// `n` values, each `1 / keep` with probability `keep` and 0 otherwise; element `i` depends on
/// `(key, i)` only.
pub(crate) fn dropout_mask(key: u64, n: usize, keep: f64) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    // Each hash gives two 32-bit uniforms; keep when the uniform is below keep · 2³².
    let threshold = (keep * 4_294_967_296.0) as u64;
    let scale = (1.0 / keep) as f32;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
        let base = (ci * CHUNK / 2) as u64;
        for (j, pair) in chunk.chunks_mut(2).enumerate() {
            let h = mix64(key ^ (base + j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let u = [h & 0xFFFF_FFFF, h >> 32];
            for (m, u) in pair.iter_mut().zip(u) {
                *m = if u < threshold { scale } else { 0.0 };
            }
        }
    });
    mask
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `GeneEncoder`: `Embedding(ntoken, d, padding_idx)` followed by `enc_norm` (LayerNorm).
#[derive(Module, Debug)]
pub struct GeneEncoder {
    pub embedding: Embedding,
    pub enc_norm: LayerNorm,
    /// `padding_idx` of the original embedding: that row receives no gradient.
    pub padding_idx: Option<usize>,
}

impl GeneEncoder {
    pub fn new(ntoken: usize, d: usize, padding_idx: Option<usize>, device: &Device) -> Self {
        // The original's init_weights overwrites the whole table (pad row included) with
        // U(-0.1, 0.1); padding_idx then only blocks the pad row's gradient.
        let embedding = EmbeddingConfig::new(ntoken, d)
            .with_initializer(Initializer::Uniform {
                min: -0.1,
                max: 0.1,
            })
            .init(device);
        Self {
            embedding,
            enc_norm: layer_norm(d, device),
            padding_idx,
        }
    }

    /// `[B, L]` token ids → `[B, L, d]` normalised gene embeddings.
    pub fn forward(&self, src: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embedding.forward(src.clone());
        self.enc_norm
            .forward(block_padding_grad(x, &src, self.padding_idx))
    }
}

/// `padding_idx` semantics of `nn.Embedding`: the looked-up rows of `pad` carry no gradient
/// back into the table. Detaching those positions leaves the forward value untouched.
pub(crate) fn block_padding_grad(
    x: Tensor<3>,
    ids: &Tensor<2, Int>,
    pad: Option<usize>,
) -> Tensor<3> {
    match pad {
        Some(pad) if x.device().is_autodiff() => {
            let [b, l, d] = x.dims();
            let is_pad = ids
                .clone()
                .equal_elem(pad as i64)
                .unsqueeze_dim::<3>(2)
                .expand([b, l, d]);
            x.clone().mask_where(is_pad, x.detach())
        }
        _ => x,
    }
}

/// `ContinuousValueEncoder`: clamp(max=512) → linear1 (1→d) → ReLU → linear2 → norm → dropout.
#[derive(Module, Debug)]
pub struct ContinuousValueEncoder {
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm: LayerNorm,
    pub dropout: Dropout,
}

impl ContinuousValueEncoder {
    pub fn new(d: usize, p: f64, device: &Device) -> Self {
        Self {
            linear1: linear(1, d, true, device),
            linear2: linear(d, d, true, device),
            norm: layer_norm(d, device),
            dropout: dropout(p),
        }
    }

    pub fn forward(&self, values: Tensor<2>) -> Tensor<3> {
        // No lower clamp: the pad (-2) and mask (-1) values go through as they are.
        let x = values.unsqueeze_dim::<3>(2).clamp_max(VALUE_CLAMP_MAX);
        let x = relu(self.linear1.forward(x));
        let x = self.norm.forward(self.linear2.forward(x));
        apply_dropout(&self.dropout, x)
    }
}

/// `CategoryValueEncoder` (and `BatchLabelEncoder`, which has the same layout):
/// `embedding` + `enc_norm`.
#[derive(Module, Debug)]
pub struct EmbeddingNorm {
    pub embedding: Embedding,
    pub enc_norm: LayerNorm,
    /// `padding_idx` (the category encoder's `pad_value`): zero at init, no gradient.
    pub padding_idx: Option<usize>,
}

impl EmbeddingNorm {
    pub fn new(n: usize, d: usize, padding_idx: Option<usize>, device: &Device) -> Self {
        let mut embedding = EmbeddingConfig::new(n, d).init(device);
        if let Some(p) = padding_idx.filter(|&p| p < n) {
            // nn.Embedding zeroes the padding row at construction (and, unlike the gene
            // encoder, nothing re-initialises it afterwards).
            let w = embedding
                .weight
                .val()
                .slice_assign([p..p + 1, 0..d], Tensor::zeros([1, d], device));
            // Detached: on an autodiff device `slice_assign` yields a non-leaf tensor, which
            // cannot become a parameter.
            embedding.weight = Param::from_tensor(w.detach());
        }
        Self {
            embedding,
            enc_norm: layer_norm(d, device),
            padding_idx,
        }
    }

    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embedding.forward(ids.clone());
        self.enc_norm
            .forward(block_padding_grad(x, &ids, self.padding_idx))
    }

    pub fn num_embeddings(&self) -> usize {
        self.embedding.weight.lazy_shape()[0]
    }
}

/// The value encoder, by `input_emb_style` (`scaling` has none).
// One instance per model, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum ValueEncoder {
    Continuous(ContinuousValueEncoder),
    Category(EmbeddingNorm),
}

/// `nn.BatchNorm1d` over `[B, C, L]`, with or without affine parameters. Written here rather
/// than using burn's `BatchNorm` because the original's DSBN is `affine=False` (no
/// weight/bias at all in the checkpoint) and because the running-variance update must use the
/// unbiased batch variance as PyTorch does.
#[derive(Module, Debug)]
pub struct BatchNorm1d {
    pub weight: Option<Param<Tensor<1>>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    pub training: Param<Flag>,
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNorm1d {
    pub fn new(c: usize, affine: bool, device: &Device) -> Self {
        let (weight, bias) = if affine {
            (
                Some(Param::from_tensor(Tensor::ones([c], device))),
                Some(Param::from_tensor(Tensor::zeros([c], device))),
            )
        } else {
            (None, None)
        };
        Self {
            weight,
            bias,
            running_mean: RunningState::new(Tensor::zeros([c], device)),
            running_var: RunningState::new(Tensor::ones([c], device)),
            training: Param::from_bool(true),
            momentum: 0.1,
            eps: BATCH_NORM_EPS,
        }
    }

    /// `x`: `[B, C, L]`. Training mode (autodiff device and training flag on) normalises with
    /// the batch statistics over B and L, padding positions included as in the original.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, c, l] = x.dims();
        let device = x.device();
        let (mean, var) = if device.is_autodiff() && self.training.is_enabled() {
            let mean = x.clone().mean_dims(&[0, 2]); // [1, C, 1]
            let centered = x.clone() - mean.clone();
            let var = centered.square().mean_dims(&[0, 2]);
            let n = (b * l) as f64;
            let unbiased = var.clone().detach().mul_scalar(n / (n - 1.0).max(1.0));
            let m = self.momentum;
            let rm = self.running_mean.value_sync().to_device(&device);
            let rv = self.running_var.value_sync().to_device(&device);
            self.running_mean.update(
                (rm.mul_scalar(1.0 - m) + mean.clone().detach().reshape([c]).mul_scalar(m))
                    .detach(),
            );
            self.running_var
                .update((rv.mul_scalar(1.0 - m) + unbiased.reshape([c]).mul_scalar(m)).detach());
            (mean, var)
        } else {
            // `value_sync`: a value read without syncing can be one training step stale.
            let mean = self
                .running_mean
                .value_sync()
                .to_device(&device)
                .reshape([1, c, 1]);
            let var = self
                .running_var
                .value_sync()
                .to_device(&device)
                .reshape([1, c, 1]);
            (mean, var)
        };
        let mut y = (x - mean) / var.add_scalar(self.eps).sqrt();
        if let Some(w) = &self.weight {
            y = y * w.val().reshape([1, c, 1]);
        }
        if let Some(bias) = &self.bias {
            y = y + bias.val().reshape([1, c, 1]);
        }
        y
    }
}

/// `DomainSpecificBatchNorm1d`: one affine-free `BatchNorm1d` per domain under `bns.k`.
#[derive(Module, Debug)]
pub struct DomainSpecificBatchNorm {
    pub bns: Vec<BatchNorm1d>,
}

impl DomainSpecificBatchNorm {
    pub fn new(c: usize, domains: usize, device: &Device) -> Self {
        Self {
            bns: (0..domains)
                .map(|_| BatchNorm1d::new(c, false, device))
                .collect(),
        }
    }
}

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
}

/// Score used for masked keys in the explicit path. Finite so that a row whose keys are all
/// masked gives a uniform average instead of NaN; any real score is far above it.
const MASKED_SCORE: f32 = -1.0e30;

impl SelfAttention {
    pub fn new(d: usize, nhead: usize, p: f64, device: &Device) -> Self {
        Self {
            Wqkv: linear(d, 3 * d, true, device),
            out_proj: linear(d, d, true, device),
            dropout: dropout(p),
            nhead,
        }
    }

    /// `[B, L, 3d]` packed projections → three `[B, H, L, d/H]` tensors.
    pub fn split_heads(&self, qkv: Tensor<3>) -> [Tensor<4>; 3] {
        let [b, l, d3] = qkv.dims();
        let d = d3 / 3;
        let h = self.nhead;
        let mut parts = qkv
            .chunk(3, 2)
            .into_iter()
            .map(|t| t.reshape([b, l, h, d / h]).swap_dims(1, 2));
        [
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        ]
    }

    /// `[B, H, L, dh]` → `[B, L, H·dh]`.
    pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
        let [b, h, l, dh] = x.dims();
        x.swap_dims(1, 2).reshape([b, l, h * dh])
    }

    /// Scaled dot-product attention with a boolean mask (`true` = may not attend), broadcast
    /// to `[B, H, Lq, Lk]`, and dropout on the weights when training.
    pub fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Option<Tensor<4, Bool>>,
    ) -> Tensor<4> {
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
    pub(crate) fn attend_explicit(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Option<Tensor<4, Bool>>,
        dh: usize,
    ) -> Tensor<4> {
        let mut scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (dh as f64).sqrt());
        if let Some(m) = mask {
            scores = scores.mask_fill(m, MASKED_SCORE);
        }
        let weights = apply_dropout(&self.dropout, softmax(scores, 3));
        weights.matmul(v)
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
        let mask = key_padding_mask.map(|m| m.unsqueeze_dims::<4>(&[1, 2]));
        self.out_proj
            .forward(Self::merge_heads(self.attend(q, k, v, mask)))
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
        let pcpt_self_mask = pcpt_mask.clone().map(|m| m.unsqueeze_dims::<4>(&[1, 2]));
        let pcpt_ctx = self.out_proj.forward(Self::merge_heads(self.attend(
            pq,
            pk.clone(),
            pv.clone(),
            pcpt_self_mask,
        )));

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
        let mut weights = softmax(Tensor::cat(vec![to_pcpt, to_self], 3), 3);
        if dropout_active(&self.dropout, &weights) {
            weights = apply_dropout(&self.dropout, weights);
        }
        let w_pcpt = weights.clone().slice([0..b, 0..h, 0..g, 0..p]);
        let w_self = weights.slice([0..b, 0..h, 0..g, p..p + 1]);
        let gen_ctx = Self::merge_heads(w_pcpt.matmul(pv) + w_self * gv);
        (pcpt_ctx, gen_ctx)
    }
}

/// One post-norm encoder layer (`FlashTransformerEncoderLayer` / `nn.TransformerEncoderLayer`):
/// `h = norm1(x + dropout1(attn(x)))`, `y = norm2(h + dropout2(linear2(dropout(relu(linear1(h))))))`.
#[derive(Module, Debug)]
pub struct EncoderLayer {
    pub self_attn: SelfAttention,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub dropout: Dropout,
    pub dropout1: Dropout,
    pub dropout2: Dropout,
}

impl EncoderLayer {
    pub fn new(d: usize, nhead: usize, d_hid: usize, p: f64, device: &Device) -> Self {
        Self {
            self_attn: SelfAttention::new(d, nhead, p, device),
            linear1: linear(d, d_hid, true, device),
            linear2: linear(d_hid, d, true, device),
            norm1: layer_norm(d, device),
            norm2: layer_norm(d, device),
            dropout: dropout(p),
            dropout1: dropout(p),
            dropout2: dropout(p),
        }
    }

    /// Residual + norm around an already computed attention output (shared by the standard
    /// and the generative forward, which differ only in how attention is computed).
    pub fn post_attention(&self, x: Tensor<3>, attn: Tensor<3>) -> Tensor<3> {
        let h = self.norm1.forward(x + apply_dropout(&self.dropout1, attn));
        let ff = self
            .linear2
            .forward(apply_dropout(&self.dropout, relu(self.linear1.forward(h.clone()))));
        self.norm2.forward(h + apply_dropout(&self.dropout2, ff))
    }

    pub fn forward(&self, x: Tensor<3>, key_padding_mask: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let attn = self.self_attn.forward(x.clone(), key_padding_mask);
        self.post_attention(x, attn)
    }
}

/// `nn.TransformerEncoder(layer, nlayers, norm=None)`: the layers in sequence, no final norm.
#[derive(Module, Debug)]
pub struct TransformerEncoder {
    pub layers: Vec<EncoderLayer>,
}

impl TransformerEncoder {
    /// `nlayers` post-norm layers. With `identical` (the original's behaviour) every layer
    /// starts with layer 0's values — `nn.TransformerEncoder` deep-copies one layer — while
    /// keeping its own parameters (distinct ids, trained independently).
    pub fn new(
        d: usize,
        nhead: usize,
        d_hid: usize,
        p: f64,
        nlayers: usize,
        identical: bool,
        device: &Device,
    ) -> Self {
        let mut layers: Vec<EncoderLayer> = (0..nlayers)
            .map(|_| EncoderLayer::new(d, nhead, d_hid, p, device))
            .collect();
        if identical && nlayers > 1 {
            use burn::store::ModuleSnapshot;
            // Without the parameter ids: applying them would make every layer share
            // layer 0's ids (one parameter to an optimiser).
            let first: Vec<_> = layers[0]
                .collect(None, None, false)
                .into_iter()
                .map(|mut t| {
                    t.param_id = None;
                    t
                })
                .collect();
            for layer in &mut layers[1..] {
                let result = layer.apply(first.clone(), None, None, false);
                assert!(
                    result.errors.is_empty() && result.missing.is_empty(),
                    "copying layer 0 into an identical layer failed: {result}"
                );
            }
        }
        Self { layers }
    }

    /// The `dev-temp` generator (`FlashscGPTGenerator`): both streams through every layer,
    /// each with its own residuals and norms but the layer's shared weights.
    pub fn forward_generative(
        &self,
        mut pcpt: Tensor<3>,
        mut gen: Tensor<3>,
        pcpt_mask: Option<Tensor<2, Bool>>,
        gen_mask: Option<Tensor<2, Bool>>,
    ) -> (Tensor<3>, Tensor<3>) {
        for layer in &self.layers {
            let (pa, ga) = layer.self_attn.forward_generative(
                pcpt.clone(),
                gen.clone(),
                pcpt_mask.clone(),
                gen_mask.clone(),
            );
            pcpt = layer.post_attention(pcpt, pa);
            gen = layer.post_attention(gen, ga);
        }
        (pcpt, gen)
    }

    pub fn forward(
        &self,
        mut x: Tensor<3>,
        key_padding_mask: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        for layer in &self.layers {
            x = layer.forward(x, key_padding_mask.clone());
        }
        x
    }
}

/// `ExprDecoder`: `fc` = [Linear(d_in,d), LeakyReLU, Linear(d,d), LeakyReLU, Linear(d,1)]
/// (PyTorch indices 0, 2, 4 → `Vec` indices 0, 1, 2), plus the same stack as `zero_logit`
/// when `explicit_zero_prob`.
#[derive(Module, Debug)]
pub struct ExprDecoder {
    pub fc: Vec<Linear>,
    pub zero_logit: Option<Vec<Linear>>,
}

fn leaky_mlp(layers: &[Linear], x: Tensor<3>) -> Tensor<3> {
    let last = layers.len() - 1;
    layers.iter().enumerate().fold(x, |x, (i, l)| {
        let y = l.forward(x);
        if i < last {
            leaky_relu(y, LEAKY_SLOPE)
        } else {
            y
        }
    })
}

impl ExprDecoder {
    pub fn new(d: usize, d_in: usize, explicit_zero_prob: bool, device: &Device) -> Self {
        let stack = || {
            vec![
                linear(d_in, d, true, device),
                linear(d, d, true, device),
                linear(d, 1, true, device),
            ]
        };
        Self {
            fc: stack(),
            zero_logit: explicit_zero_prob.then(stack),
        }
    }

    /// `x`: `[B, L, d_in]` → (`pred` `[B, L]`, `zero_probs` `[B, L]` if explicit_zero_prob).
    pub fn forward(&self, x: Tensor<3>) -> (Tensor<2>, Option<Tensor<2>>) {
        let pred = leaky_mlp(&self.fc, x.clone()).squeeze_dim::<2>(2);
        let zero = self
            .zero_logit
            .as_ref()
            .map(|z| sigmoid(leaky_mlp(z, x).squeeze_dim::<2>(2)));
        (pred, zero)
    }
}

/// A parameter-holding entry of a `ClsDecoder` / `AdversarialDiscriminator` `_decoder`
/// ModuleList: the list is [Linear, activation, LayerNorm] × (nlayers−1), and the activations
/// have no parameters, so PyTorch indices 0, 2, 3, 5, … become `Vec` indices 0, 1, 2, 3, ….
#[derive(Module, Debug)]
pub enum HeadLayer {
    Linear(Linear),
    Norm(LayerNorm),
}

/// Activation after each hidden Linear of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadActivation {
    Relu,
    LeakyRelu,
}

fn head_layers(d: usize, nlayers: usize, device: &Device) -> Vec<HeadLayer> {
    (0..nlayers.saturating_sub(1))
        .flat_map(|_| {
            [
                HeadLayer::Linear(linear(d, d, true, device)),
                HeadLayer::Norm(layer_norm(d, device)),
            ]
        })
        .collect()
}

fn head_forward(layers: &[HeadLayer], act: HeadActivation, mut x: Tensor<2>) -> Tensor<2> {
    for layer in layers {
        x = match layer {
            HeadLayer::Linear(l) => match act {
                HeadActivation::Relu => relu(l.forward(x)),
                HeadActivation::LeakyRelu => leaky_relu(l.forward(x), LEAKY_SLOPE),
            },
            HeadLayer::Norm(n) => n.forward(x),
        };
    }
    x
}

/// `ClsDecoder(d, n_cls, nlayers)`: `_decoder` ([Linear, ReLU, LayerNorm] × (nlayers−1)), then
/// `out_layer`.
#[derive(Module, Debug)]
pub struct ClsDecoder {
    pub _decoder: Vec<HeadLayer>,
    pub out_layer: Linear,
}

impl ClsDecoder {
    pub fn new(d: usize, n_cls: usize, nlayers: usize, device: &Device) -> Self {
        Self {
            _decoder: head_layers(d, nlayers, device),
            out_layer: linear(d, n_cls, true, device),
        }
    }

    /// `[B, d]` → `[B, n_cls]` logits.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out_layer
            .forward(head_forward(&self._decoder, HeadActivation::Relu, x))
    }
}

/// Gradient reversal (λ = 1): identity forward, negated gradient backward. `2·sg(x) − x` is
/// exactly `x` in floating point (doubling is exact and the subtraction is exact by
/// Sterbenz's lemma) and its derivative is −1, so no custom backward op is needed.
pub fn grad_reverse<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone().detach().mul_scalar(2.0) - x
}

/// `AdversarialDiscriminator(d, n_cls=num_batch_labels, nlayers=3, LeakyReLU,
/// reverse_grad=True)` (`grad_reverse_discriminator`).
#[derive(Module, Debug)]
pub struct AdversarialDiscriminator {
    pub _decoder: Vec<HeadLayer>,
    pub out_layer: Linear,
    pub reverse_grad: bool,
}

impl AdversarialDiscriminator {
    pub fn new(
        d: usize,
        n_cls: usize,
        nlayers: usize,
        reverse_grad: bool,
        device: &Device,
    ) -> Self {
        Self {
            _decoder: head_layers(d, nlayers, device),
            out_layer: linear(d, n_cls, true, device),
            reverse_grad,
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = if self.reverse_grad {
            grad_reverse(x)
        } else {
            x
        };
        self.out_layer
            .forward(head_forward(&self._decoder, HeadActivation::LeakyRelu, x))
    }
}

/// `MVCDecoder` in the "inner product" styles: `q = sigmoid(gene2query(gene_emb))`,
/// `pred_l = <W(q_l), cell_emb>`; with explicit_zero_prob also
/// `zero_prob_l = sigmoid(<W_zero_logit(q_l), cell_emb>)`.
#[derive(Module, Debug)]
pub struct MvcDecoder {
    pub gene2query: Linear,
    pub W: Linear,
    pub W_zero_logit: Option<Linear>,
    /// "inner product, detach": no gradient into the gene embeddings through this head.
    pub detach_genes: bool,
}

impl MvcDecoder {
    pub fn new(
        d: usize,
        d_in: usize,
        explicit_zero_prob: bool,
        detach: bool,
        device: &Device,
    ) -> Self {
        Self {
            gene2query: linear(d, d, true, device),
            W: linear(d, d_in, false, device),
            W_zero_logit: explicit_zero_prob.then(|| linear(d, d_in, true, device)),
            detach_genes: detach,
        }
    }

    /// `cell_emb`: `[B, d_in]`; `gene_embs`: `[B, L, d]` → (`pred` `[B, L]`, `zero_probs`).
    pub fn forward(
        &self,
        cell_emb: Tensor<2>,
        gene_embs: Tensor<3>,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        let gene_embs = if self.detach_genes {
            gene_embs.detach()
        } else {
            gene_embs
        };
        let q = sigmoid(self.gene2query.forward(gene_embs));
        let c = cell_emb.unsqueeze_dim::<3>(2); // [B, d_in, 1]
        let pred = self
            .W
            .forward(q.clone())
            .matmul(c.clone())
            .squeeze_dim::<2>(2);
        let zero = self
            .W_zero_logit
            .as_ref()
            .map(|w| sigmoid(w.forward(q).matmul(c).squeeze_dim::<2>(2)));
        (pred, zero)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn pad_mask(device: &Device) -> Tensor<2, Bool> {
        Tensor::from_data(
            TensorData::new(
                vec![false, false, false, true, false, false, true, true],
                [2, 4],
            ),
            device,
        )
    }

    #[test]
    fn explicit_attention_equals_fused_kernel() {
        // Training uses the explicit softmax path (it needs dropout on the weights), inference
        // the fused kernel; with dropout off they must agree, padded query rows included.
        let device = Device::flex();
        let att = SelfAttention::new(16, 4, 0.0, &device);
        let x = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device);
        let [q, k, v] = att.split_heads(att.Wqkv.forward(x));
        let mask = Some(
            pad_mask(&device)
                .unsqueeze_dims::<4>(&[1, 2])
                .expand([2, 4, 4, 4]),
        );
        let fused = att.attend(q.clone(), k.clone(), v.clone(), mask.clone());
        let explicit = att.attend_explicit(q, k, v, mask, 4);
        let diff = (fused - explicit).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn dropout_is_active_only_when_training() {
        let device = Device::flex().autodiff();
        let layer = EncoderLayer::new(16, 4, 24, 0.5, &device);
        let x =
            Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let a = layer.forward(x.clone(), Some(pad_mask(&device)));
        let b = layer.forward(x.clone(), Some(pad_mask(&device)));
        assert!(
            (a.clone() - b).abs().max().into_scalar::<f32>() > 1e-3,
            "no dropout in training"
        );
        let grads = a.sum().backward();
        assert!(x.grad(&grads).is_some());
        // `valid()` switches every dropout (including the attention-weight one) off.
        let eval = layer.valid();
        let x = x.inner();
        let a = eval.forward(x.clone(), Some(pad_mask(&x.device())));
        let b = eval.forward(x.clone(), Some(pad_mask(&x.device())));
        assert_eq!((a - b).abs().max().into_scalar::<f32>(), 0.0);
    }

    #[test]
    fn dropout_mask_keeps_the_expected_share_and_depends_only_on_the_key() {
        let n = 1_000_001; // odd: the last hash fills one element
        let keep = 0.8;
        let m = dropout_mask(7, n, keep);
        let kept = m.iter().filter(|v| **v > 0.0).count() as f64;
        // Binomial(n, 0.8): sd = 400; 6 sd either side.
        assert!((kept - keep * n as f64).abs() < 2_400.0, "kept {kept}");
        assert!(m.iter().all(|v| *v == 0.0 || *v == 1.25));
        assert_eq!(m, dropout_mask(7, n, keep), "same key, same mask");
        let other = dropout_mask(8, n, keep);
        let same = m.iter().zip(&other).filter(|(a, b)| a == b).count() as f64;
        // Independent masks agree with probability 0.8² + 0.2² = 0.68.
        assert!((same / n as f64 - 0.68).abs() < 0.01, "{same}");
        // Neighbouring elements are not correlated.
        let both = m.windows(2).filter(|w| w[0] > 0.0 && w[1] > 0.0).count() as f64;
        assert!((both / (n - 1) as f64 - 0.64).abs() < 0.01, "{both}");
    }

    #[test]
    fn dropout_scales_kept_values_follows_the_seed_and_passes_gradients_through_the_mask() {
        let device = Device::flex().autodiff();
        let d = DropoutConfig::new(0.25).init();
        let x = Tensor::<2>::ones([64, 513], &device).require_grad();
        device.seed(3);
        let y = apply_dropout(&d, x.clone());
        let v: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
        assert!(v.iter().all(|e| *e == 0.0 || (*e - 4.0 / 3.0).abs() < 1e-6));
        let dropped = v.iter().filter(|e| **e == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
        device.seed(3);
        let again: Vec<f32> = apply_dropout(&d, x.clone()).into_data().try_to_vec().unwrap();
        assert_eq!(v, again, "Device::seed fixes the mask");
        let next: Vec<f32> = apply_dropout(&d, x.clone()).into_data().try_to_vec().unwrap();
        assert_ne!(v, next, "consecutive calls draw new masks");
        // d(sum y)/dx is the mask itself.
        let grads = y.sum().backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        assert_eq!(g, v);
        // Inference: the identity.
        let plain = Tensor::<2>::ones([4, 4], &Device::flex());
        assert_eq!(apply_dropout(&d, plain.clone()).into_data(), plain.into_data());
    }

    #[test]
    fn identical_layer_init_copies_values_not_parameters() {
        use burn::store::ModuleSnapshot;
        let device = Device::flex();
        let tensors = |l: &EncoderLayer| -> Vec<(String, Vec<u8>)> {
            l.collect(None, None, false)
                .into_iter()
                .map(|t| (t.name.clone(), t.into_bytes().unwrap().to_vec()))
                .collect()
        };
        let mut config = crate::ModelConfig::new(10, 8, 2, 12, 3);
        assert!(
            config.identical_layer_init,
            "the original's behaviour is the default"
        );
        let model = config.init(&device).unwrap();
        let layers = &model.transformer_encoder.layers;
        assert_eq!(tensors(&layers[1]), tensors(&layers[0]));
        assert_eq!(tensors(&layers[2]), tensors(&layers[0]));
        // Separate parameters (what the deep copy gives), not one shared layer.
        assert_ne!(layers[0].linear1.weight.id, layers[1].linear1.weight.id);
        assert_ne!(
            layers[1].self_attn.Wqkv.weight.id,
            layers[2].self_attn.Wqkv.weight.id
        );
        // Training moves them apart: a gradient step on one layer leaves the others alone.
        let ad = Device::flex().autodiff();
        let m = config.init(&ad).unwrap();
        let x = Tensor::<3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &ad);
        let y = m.transformer_encoder.layers[0].forward(x, None);
        let grads = (y.clone() * y).sum().backward();
        assert!(m.transformer_encoder.layers[0]
            .linear1
            .weight
            .grad(&grads)
            .is_some());
        assert!(m.transformer_encoder.layers[1]
            .linear1
            .weight
            .grad(&grads)
            .is_none());

        config.identical_layer_init = false;
        let model = config.init(&device).unwrap();
        let layers = &model.transformer_encoder.layers;
        assert_ne!(tensors(&layers[1]), tensors(&layers[0]));
    }

    #[test]
    fn padded_embedding_builds_on_an_autodiff_device() {
        // The zeroed padding row used to make the weight a non-leaf tensor, which panics
        // when it becomes a parameter on an autodiff device (category models in training).
        let device = Device::flex().autodiff();
        let enc = EmbeddingNorm::new(5, 4, Some(3), &device);
        let ids = Tensor::<2, Int>::from_data([[3i64, 1]], &device);
        // A weighted sum: a plain sum of LayerNorm outputs has zero gradient.
        let w = Tensor::<1, Int>::arange(0..8, &device)
            .float()
            .reshape([1, 2, 4]);
        let grads = (enc.forward(ids) * w.square()).sum().backward();
        let g = enc.embedding.weight.grad(&grads).unwrap();
        let g: Vec<f32> = g.into_data().convert::<f32>().try_into_vec().unwrap();
        assert!(
            g[12..16].iter().all(|&x| x == 0.0),
            "pad row got a gradient"
        );
        assert!(g[4..8].iter().any(|&x| x != 0.0));
    }

    #[test]
    fn gradient_reversal_is_identity_forward_and_negates_backward() {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 3.0), &device).require_grad();
        let y = grad_reverse(x.clone());
        let xs: Vec<f32> = x
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        let ys: Vec<f32> = y
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        assert_eq!(xs, ys, "forward must be bit-exact");
        let w = Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
        let grads = (y * w.clone()).sum().backward();
        let g = x.grad(&grads).unwrap();
        let diff = (g + w.inner()).abs().max().into_scalar::<f32>();
        assert_eq!(diff, 0.0);
    }
}
