//! What turns a cell into token vectors: the gene and value encoders, and the batch norms
//! applied to their sum.

use burn::module::{Flag, Module, Param, RunningState};
use burn::nn::{Dropout, Embedding, EmbeddingConfig, Initializer, LayerNorm, Linear};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor};

use super::*;

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
        let embedding = EmbeddingConfig::new(ntoken, d).with_initializer(Initializer::Uniform { min: -0.1, max: 0.1 }).init(device);
        Self { embedding, enc_norm: layer_norm(d, device), padding_idx }
    }

    /// `[B, L]` token ids → `[B, L, d]` normalised gene embeddings.
    pub fn forward(&self, src: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embedding.forward(src.clone());
        self.enc_norm.forward(block_padding_grad(x, &src, self.padding_idx))
    }
}

/// `padding_idx` semantics of `nn.Embedding`: the looked-up rows of `pad` carry no gradient
/// back into the table. Detaching those positions leaves the forward value untouched.
pub(crate) fn block_padding_grad(x: Tensor<3>, ids: &Tensor<2, Int>, pad: Option<usize>) -> Tensor<3> {
    match pad {
        Some(pad) if x.device().is_autodiff() => {
            let [b, l, d] = x.dims();
            let is_pad = ids.clone().equal_elem(pad as i64).unsqueeze_dim::<3>(2).expand([b, l, d]);
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
        Self { linear1: linear(1, d, true, device), linear2: linear(d, d, true, device), norm: layer_norm(d, device), dropout: dropout(p) }
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
            let w = embedding.weight.val().slice_assign([p..p + 1, 0..d], Tensor::zeros([1, d], device));
            // Detached: on an autodiff device `slice_assign` yields a non-leaf tensor, which
            // cannot become a parameter.
            embedding.weight = Param::from_tensor(w.detach());
        }
        Self { embedding, enc_norm: layer_norm(d, device), padding_idx }
    }

    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embedding.forward(ids.clone());
        self.enc_norm.forward(block_padding_grad(x, &ids, self.padding_idx))
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
            (Some(Param::from_tensor(Tensor::ones([c], device))), Some(Param::from_tensor(Tensor::zeros([c], device))))
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
            self.running_mean.update((rm.mul_scalar(1.0 - m) + mean.clone().detach().reshape([c]).mul_scalar(m)).detach());
            self.running_var.update((rv.mul_scalar(1.0 - m) + unbiased.reshape([c]).mul_scalar(m)).detach());
            (mean, var)
        } else {
            // `value_sync`: a value read without syncing can be one training step stale.
            let mean = self.running_mean.value_sync().to_device(&device).reshape([1, c, 1]);
            let var = self.running_var.value_sync().to_device(&device).reshape([1, c, 1]);
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
        Self { bns: (0..domains).map(|_| BatchNorm1d::new(c, false, device)).collect() }
    }
}
