//! The original's objective functions (`scgpt/loss.py`). `mask` selects the positions that
//! count (true = in the loss); every loss is normalised by the number of selected positions.

use burn::tensor::{Bool, Tensor};

/// `masked_mse_loss`: Σ((pred·m − target·m)²) / Σm.
pub fn masked_mse_loss<const D: usize>(pred: Tensor<D>, target: Tensor<D>, mask: Tensor<D, Bool>) -> Tensor<1> {
    let m = mask.float();
    let diff = pred * m.clone() - target * m.clone();
    diff.square().sum() / m.sum()
}

/// `criterion_neg_log_bernoulli` (the "nzlp" loss of explicit_zero_prob): the negative
/// log-likelihood of `target > 0` under Bernoulli(`probs`), averaged over the mask.
/// `torch.distributions.Bernoulli(probs=…)` clamps the probabilities to [ε, 1−ε] with ε the
/// float32 machine epsilon before taking logs, so a probability of exactly 0 or 1 costs
/// −ln ε ≈ 15.9 when wrong instead of infinity; that clamp is reproduced.
pub fn criterion_neg_log_bernoulli<const D: usize>(probs: Tensor<D>, target: Tensor<D>, mask: Tensor<D, Bool>) -> Tensor<1> {
    let eps = f32::EPSILON as f64;
    let p = probs.clamp(eps, 1.0 - eps);
    let x = target.greater_elem(0.0).float();
    let log_prob = x.clone() * p.clone().log() + x.neg().add_scalar(1.0) * p.neg().add_scalar(1.0).log();
    let m = mask.float();
    (log_prob * m.clone()).sum().neg() / m.sum()
}

/// `masked_relative_error`: mean of |pred − target| / (target + 1e-6) over the mask (only
/// logged by the original, never optimised).
pub fn masked_relative_error<const D: usize>(pred: Tensor<D>, target: Tensor<D>, mask: Tensor<D, Bool>) -> Tensor<1> {
    let m = mask.float();
    let rel = (pred - target.clone()).abs() / target.add_scalar(1e-6);
    (rel * m.clone()).sum() / m.sum()
}
