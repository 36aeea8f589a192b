//! The heads on the encoder's output: expression (GEP), cell-type (CLS), MVC (GEPC) and the
//! adversarial batch discriminator (DAR).

use burn::module::Module;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::{leaky_relu, relu, sigmoid};
use burn::tensor::{Device, Tensor};

use super::*;

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
        let stack = || vec![linear(d_in, d, true, device), linear(d, d, true, device), linear(d, 1, true, device)];
        Self { fc: stack(), zero_logit: explicit_zero_prob.then(stack) }
    }

    /// `x`: `[B, L, d_in]` → (`pred` `[B, L]`, `zero_probs` `[B, L]` if explicit_zero_prob).
    pub fn forward(&self, x: Tensor<3>) -> (Tensor<2>, Option<Tensor<2>>) {
        let pred = leaky_mlp(&self.fc, x.clone()).squeeze_dim::<2>(2);
        let zero = self.zero_logit.as_ref().map(|z| sigmoid(leaky_mlp(z, x).squeeze_dim::<2>(2)));
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
        .flat_map(|_| [HeadLayer::Linear(linear(d, d, true, device)), HeadLayer::Norm(layer_norm(d, device))])
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
        Self { _decoder: head_layers(d, nlayers, device), out_layer: linear(d, n_cls, true, device) }
    }

    /// `[B, d]` → `[B, n_cls]` logits.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out_layer.forward(head_forward(&self._decoder, HeadActivation::Relu, x))
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
    pub fn new(d: usize, n_cls: usize, nlayers: usize, reverse_grad: bool, device: &Device) -> Self {
        Self { _decoder: head_layers(d, nlayers, device), out_layer: linear(d, n_cls, true, device), reverse_grad }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = if self.reverse_grad { grad_reverse(x) } else { x };
        self.out_layer.forward(head_forward(&self._decoder, HeadActivation::LeakyRelu, x))
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
    pub fn new(d: usize, d_in: usize, explicit_zero_prob: bool, detach: bool, device: &Device) -> Self {
        Self {
            gene2query: linear(d, d, true, device),
            W: linear(d, d_in, false, device),
            W_zero_logit: explicit_zero_prob.then(|| linear(d, d_in, true, device)),
            detach_genes: detach,
        }
    }

    /// `cell_emb`: `[B, d_in]`; `gene_embs`: `[B, L, d]` → (`pred` `[B, L]`, `zero_probs`).
    pub fn forward(&self, cell_emb: Tensor<2>, gene_embs: Tensor<3>) -> (Tensor<2>, Option<Tensor<2>>) {
        let gene_embs = if self.detach_genes { gene_embs.detach() } else { gene_embs };
        let q = sigmoid(self.gene2query.forward(gene_embs));
        let c = cell_emb.unsqueeze_dim::<3>(2); // [B, d_in, 1]
        let pred = self.W.forward(q.clone()).matmul(c.clone()).squeeze_dim::<2>(2);
        let zero = self.W_zero_logit.as_ref().map(|w| sigmoid(w.forward(q).matmul(c).squeeze_dim::<2>(2)));
        (pred, zero)
    }
}
