//! `train.precision`: what a training step computes in and what it keeps.
//!
//! - `fp32`: everything in fp32.
//! - `bf16`: mixed precision. The model's parameters (the masters), their gradients and Adam's
//!   moments stay fp32; each optimiser step computes the forward and backward on a bf16 copy of
//!   the parameters, cast inside the autodiff graph so the gradients arrive on the fp32 masters
//!   (cast back to fp32 by the cast's backward), where they are accumulated, all-reduced,
//!   clipped and applied. Checkpoints and exports hold the masters. A 1e-4 step of a weight
//!   near 1 is below half a bf16 ulp (2⁻⁸), so a bf16 parameter would not move at all.
//! - `bf16-pure`: parameters, activations and moments all bf16; kept under its own name for
//!   memory experiments, it does not learn at small learning rates.
//!
//! Under both bf16 modes the device's default float type is bf16 (`device.rs`), so inputs and
//! activations are bf16.

use scgpt_model::burn::module::Module;
use scgpt_model::burn::tensor::FloatDType;
use scgpt_model::cast::{cast_params, CastGraph};

use crate::config::Precision;

/// The parameters a run keeps between steps: fp32 masters under `bf16`, bf16 under
/// `bf16-pure`, fp32 otherwise.
pub fn masters<M: Module>(model: M, precision: Precision) -> M {
    match precision {
        Precision::Bf16 => cast_params(model, FloatDType::F32, CastGraph::Leaf),
        Precision::PureBf16 => cast_params(model, FloatDType::BF16, CastGraph::Leaf),
        Precision::Fp32 => model,
    }
}

/// The model a step computes with: a bf16 copy of the masters under `bf16`, whose gradients
/// reach the masters; the masters themselves otherwise.
pub fn compute<M: Module + Clone>(masters: &M, precision: Precision) -> M {
    match precision {
        Precision::Bf16 => cast_params(masters.clone(), FloatDType::BF16, CastGraph::Recorded),
        Precision::Fp32 | Precision::PureBf16 => masters.clone(),
    }
}
