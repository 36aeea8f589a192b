//! The device a run trains on: burn Flex on the CPU in every build; CUDA (`--features cuda`,
//! one process per GPU, `LOCAL_RANK` picks it) and wgpu/Vulkan (`--features wgpu`/`vulkan`)
//! in GPU builds. `precision = "bf16"` or `"bf16-pure"` switches the device's default float type
//! to bf16 (activations and inputs) where the backend computes in it; `precision.rs` decides what
//! stays fp32.

use anyhow::bail;
use scgpt_model::burn::tensor::{Device, FloatDType};

/// Names this build accepts for `run.device`.
pub fn available() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = vec!["cpu"];
    #[cfg(feature = "cuda")]
    v.push("cuda");
    #[cfg(feature = "wgpu")]
    v.push("wgpu");
    #[cfg(feature = "vulkan")]
    v.extend(["vulkan", "vulkan-cpu"]);
    v
}

/// The plain (non-autodiff) device for `name` and this process's local rank. A CUDA rank takes
/// the GPU [`scgpt_dist::gpu_ordinal`] picks from `CUDA_VISIBLE_DEVICES` (the one visible GPU
/// under Slurm's `--gpus-per-task=1`, else the local rank's), as the NCCL setup does.
pub fn select(name: &str, local_rank: usize) -> anyhow::Result<Device> {
    #[allow(unused_variables)]
    let ordinal = || -> anyhow::Result<usize> {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        Ok(scgpt_dist::gpu_ordinal(local_rank, scgpt_dist::visible_gpus(visible.as_deref()))?)
    };
    let device = match name {
        "cpu" => Device::flex(),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(ordinal()?),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(scgpt_model::burn::tensor::DeviceKind::DiscreteGpu(local_rank)),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(scgpt_model::burn::tensor::DeviceKind::DiscreteGpu(local_rank)),
        // Vulkan on a CPU device (Mesa's lavapipe): GPU kernels checked on a machine without one.
        #[cfg(feature = "vulkan")]
        "vulkan-cpu" => Device::vulkan(scgpt_model::burn::tensor::DeviceKind::Cpu),
        other => bail!(
            "device {other:?}: this build has {}; GPU builds: `cargo build --release --features cuda` (clusters) or `--features vulkan`",
            available().join(", ")
        ),
    };
    Ok(device)
}

/// Applies `precision` to a device before any tensor exists on it.
pub fn configure_precision(device: &mut Device, precision: &str) -> anyhow::Result<()> {
    match precision {
        "fp32" => Ok(()),
        "bf16" | "bf16-pure" => {
            if !device.supports_dtype(FloatDType::BF16) {
                bail!("train.precision = {precision:?}: this device cannot compute in bf16; use \"fp32\"");
            }
            match device.configure(FloatDType::BF16) {
                Ok(()) => Ok(()),
                // Set once per process: a second run in the same process (tests, a resume in
                // one program) finds it done.
                Err(_)
                    if scgpt_model::burn::tensor::Tensor::<1>::zeros([1], &*device).dtype() == scgpt_model::burn::tensor::DType::BF16 =>
                {
                    Ok(())
                }
                Err(e) => Err(anyhow::anyhow!("train.precision = {precision:?}: {e:?}")),
            }
        }
        other => bail!("train.precision = {other:?}: expected \"fp32\", \"bf16\" or \"bf16-pure\""),
    }
}
