//! The transformer encoder: post-norm layers in sequence, and the generative two-stream pass.

use burn::module::Module;
use burn::nn::{Dropout, LayerNorm, Linear};
use burn::tensor::activation::relu;
use burn::tensor::{Bool, Device, Tensor};

use super::*;

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
        let ff = self.linear2.forward(apply_dropout(&self.dropout, relu(self.linear1.forward(h.clone()))));
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
    pub fn new(d: usize, nhead: usize, d_hid: usize, p: f64, nlayers: usize, identical: bool, device: &Device) -> Self {
        let mut layers: Vec<EncoderLayer> = (0..nlayers).map(|_| EncoderLayer::new(d, nhead, d_hid, p, device)).collect();
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
                assert!(result.errors.is_empty() && result.missing.is_empty(), "copying layer 0 into an identical layer failed: {result}");
            }
        }
        Self { layers }
    }

    /// Every layer's attention computing training steps with `mode`.
    pub fn with_attention(self, mode: AttentionMode) -> Self {
        let layers = self
            .layers
            .into_iter()
            .map(|mut layer| {
                layer.self_attn = layer.self_attn.with_attention(mode);
                layer
            })
            .collect();
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
            let (pa, ga) = layer.self_attn.forward_generative(pcpt.clone(), gen.clone(), pcpt_mask.clone(), gen_mask.clone());
            pcpt = layer.post_attention(pcpt, pa);
            gen = layer.post_attention(gen, ga);
        }
        (pcpt, gen)
    }

    pub fn forward(&self, mut x: Tensor<3>, key_padding_mask: Option<Tensor<2, Bool>>) -> Tensor<3> {
        for layer in &self.layers {
            x = layer.forward(x, key_padding_mask.clone());
        }
        x
    }
}
