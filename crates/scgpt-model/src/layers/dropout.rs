//! Dropout as burn's, on Flex as one multiply by a mask hashed from (a key drawn from burn's
//! seeded RNG, element index), filled on all cores; a seed fixes every mask on any thread count.

use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};

pub(super) fn dropout(p: f64) -> Dropout {
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
    let key = splitmix_finalizer(((draws[0] as u64) << 24) ^ draws[1] as u64 ^ 0xD209_0E7A);
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
            let h = splitmix_finalizer(key ^ (base + j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let u = [h & 0xFFFF_FFFF, h >> 32];
            for (m, u) in pair.iter_mut().zip(u) {
                *m = if u < threshold { scale } else { 0.0 };
            }
        }
    });
    mask
}

/// SplitMix64's finaliser alone, a bijective 64-bit mix (`scgpt_data::seed::mix64` is the
/// whole SplitMix64 step, increment included; the model crate does not depend on scgpt-data).
pub(super) fn splitmix_finalizer(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
