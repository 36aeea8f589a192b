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

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::Device;

/// PyTorch's `nn.LayerNorm` default, used everywhere in scGPT.
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// The original's DSBN / BatchNorm epsilon (chosen there so fp16 does not underflow).
pub const BATCH_NORM_EPS: f64 = 6.1e-5;
/// `nn.LeakyReLU()` default slope, used by `ExprDecoder` and `AdversarialDiscriminator`.
pub const LEAKY_SLOPE: f64 = 0.01;
/// `ContinuousValueEncoder.max_value`.
pub const VALUE_CLAMP_MAX: f64 = 512.0;

pub(crate) fn layer_norm(d: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).with_epsilon(LAYER_NORM_EPS).init(device)
}

/// `nn.Linear` with PyTorch's default init (kaiming-uniform a=√5 for the weight, which is
/// burn's default, and U(±1/√fan_in) for the bias, which burn's default also gives).
pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

mod attention;
mod dropout;
mod embeddings;
mod encoder;
mod heads;

pub use attention::{AttentionMode, SelfAttention};
use dropout::dropout;
pub(crate) use dropout::{apply_dropout, dropout_active};
pub(crate) use embeddings::block_padding_grad;
pub use embeddings::{BatchNorm1d, ContinuousValueEncoder, DomainSpecificBatchNorm, EmbeddingNorm, GeneEncoder, ValueEncoder};
pub use encoder::{EncoderLayer, TransformerEncoder};
pub use heads::{grad_reverse, AdversarialDiscriminator, ClsDecoder, ExprDecoder, HeadActivation, HeadLayer, MvcDecoder};

#[cfg(test)]
mod tests {
    use super::dropout::dropout_mask;
    use super::*;
    use burn::module::Module;
    use burn::nn::DropoutConfig;
    use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};

    fn pad_mask(device: &Device) -> Tensor<2, Bool> {
        Tensor::from_data(TensorData::new(vec![false, false, false, true, false, false, true, true], [2, 4]), device)
    }

    #[test]
    fn explicit_attention_equals_fused_kernel() {
        // Training uses the explicit softmax path (it needs dropout on the weights), inference
        // the fused kernel; with dropout off they must agree, padded query rows included.
        let device = Device::flex();
        let att = SelfAttention::new(16, 4, 0.0, &device);
        let x = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device);
        let [q, k, v] = att.split_heads(att.Wqkv.forward(x));
        let mask = Some(pad_mask(&device).unsqueeze_dims::<4>(&[1, 2]).expand([2, 4, 4, 4]));
        let fused = att.attend(q.clone(), k.clone(), v.clone(), mask.clone());
        let explicit = att.attend_explicit(q, k, v, mask, 4);
        let diff = (fused - explicit).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn dropout_is_active_only_when_training() {
        let device = Device::flex().autodiff();
        let layer = EncoderLayer::new(16, 4, 24, 0.5, &device);
        let x = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let a = layer.forward(x.clone(), Some(pad_mask(&device)));
        let b = layer.forward(x.clone(), Some(pad_mask(&device)));
        assert!((a.clone() - b).abs().max().into_scalar::<f32>() > 1e-3, "no dropout in training");
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
            l.collect(None, None, false).into_iter().map(|t| (t.name.clone(), t.into_bytes().unwrap().to_vec())).collect()
        };
        let mut config = crate::ModelConfig::new(10, 8, 2, 12, 3);
        assert!(config.identical_layer_init, "the original's behaviour is the default");
        let model = config.init(&device).unwrap();
        let layers = &model.transformer_encoder.layers;
        assert_eq!(tensors(&layers[1]), tensors(&layers[0]));
        assert_eq!(tensors(&layers[2]), tensors(&layers[0]));
        // Separate parameters (what the deep copy gives), not one shared layer.
        assert_ne!(layers[0].linear1.weight.id, layers[1].linear1.weight.id);
        assert_ne!(layers[1].self_attn.Wqkv.weight.id, layers[2].self_attn.Wqkv.weight.id);
        // Training moves them apart: a gradient step on one layer leaves the others alone.
        let ad = Device::flex().autodiff();
        let m = config.init(&ad).unwrap();
        let x = Tensor::<3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &ad);
        let y = m.transformer_encoder.layers[0].forward(x, None);
        let grads = (y.clone() * y).sum().backward();
        assert!(m.transformer_encoder.layers[0].linear1.weight.grad(&grads).is_some());
        assert!(m.transformer_encoder.layers[1].linear1.weight.grad(&grads).is_none());

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
        let w = Tensor::<1, Int>::arange(0..8, &device).float().reshape([1, 2, 4]);
        let grads = (enc.forward(ids) * w.square()).sum().backward();
        let g = enc.embedding.weight.grad(&grads).unwrap();
        let g: Vec<f32> = g.into_data().convert::<f32>().try_into_vec().unwrap();
        assert!(g[12..16].iter().all(|&x| x == 0.0), "pad row got a gradient");
        assert!(g[4..8].iter().any(|&x| x != 0.0));
    }

    #[test]
    fn gradient_reversal_is_identity_forward_and_negates_backward() {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 3.0), &device).require_grad();
        let y = grad_reverse(x.clone());
        let xs: Vec<f32> = x.clone().into_data().convert::<f32>().try_into_vec().unwrap();
        let ys: Vec<f32> = y.clone().into_data().convert::<f32>().try_into_vec().unwrap();
        assert_eq!(xs, ys, "forward must be bit-exact");
        let w = Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
        let grads = (y * w.clone()).sum().backward();
        let g = x.grad(&grads).unwrap();
        let diff = (g + w.inner()).abs().max().into_scalar::<f32>();
        assert_eq!(diff, 0.0);
    }
}
