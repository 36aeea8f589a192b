//! Host buffers to tensors, and the loss pieces the tasks share.

use scgpt_model::burn::tensor::activation::log_softmax;
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};

pub fn ints(v: &[i64], b: usize, l: usize, d: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, l]), d)
}

pub fn floats(v: &[f32], b: usize, l: usize, d: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, l]), d)
}

pub fn bools(v: &[bool], b: usize, l: usize, d: &Device) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, l]), d)
}

pub fn ids(v: &[i64], d: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), d)
}

/// The model's `batch_labels` input, when the run has them.
pub fn batch_labels(ids: &Option<Vec<i64>>, d: &Device) -> Option<Tensor<1, Int>> {
    ids.as_deref().map(|v| self::ids(v, d))
}

/// Σ over rows of −log softmax(logits)[target] · weight[target] (PyTorch's `CrossEntropyLoss`
/// with `reduction="sum"`; without weights every class weighs 1).
pub fn cross_entropy_sum(logits: Tensor<2>, targets: &[i64], weights: Option<&[f32]>, d: &Device) -> Tensor<1> {
    let n = targets.len();
    let logp = log_softmax(logits, 1).gather(1, ids(targets, d).reshape([n, 1])).reshape([n]);
    match weights {
        Some(w) => {
            let per: Vec<f32> = targets.iter().map(|&t| w[t as usize]).collect();
            (logp * Tensor::<1>::from_data(TensorData::new(per, [n]), d)).sum().neg()
        }
        None => logp.sum().neg(),
    }
}

/// Mean cross entropy of `[B, C]` logits against class ids (PyTorch's `CrossEntropyLoss`).
pub fn cross_entropy(logits: Tensor<2>, targets: &[i64], d: &Device) -> Tensor<1> {
    cross_entropy_sum(logits, targets, None, d).div_scalar(targets.len().max(1) as f64)
}

/// Σ ((pred − target)·keep)² over the positions where `keep` is 1.
pub fn masked_sq_sum(pred: Tensor<2>, target: Tensor<2>, keep: Tensor<2>) -> Tensor<1> {
    ((pred - target) * keep).square().sum()
}

pub fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().into_scalar::<f32>() as f64
}

pub fn to_i64(t: Tensor<1, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().try_to_vec::<i64>().expect("int tensor data")
}

/// Σ −log Bernoulli(probs)(target > 0) over the positions where `keep` is 1: the sum of the
/// original's `criterion_neg_log_bernoulli`, with the clamp of PyTorch's `Bernoulli(probs=…)`
/// to [ε, 1 − ε] (ε the float32 machine epsilon).
pub fn neg_log_bernoulli_sum(probs: Tensor<2>, target: Tensor<2>, keep: Tensor<2>) -> Tensor<1> {
    let eps = f32::EPSILON as f64;
    let p = probs.clamp(eps, 1.0 - eps);
    let x = target.greater_elem(0.0).float();
    let log_prob = x.clone() * p.clone().log() + x.neg().add_scalar(1.0) * p.neg().add_scalar(1.0).log();
    (log_prob * keep).sum().neg()
}
