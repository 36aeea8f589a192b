//! The device a run trains on: burn Flex on the CPU in every build; CUDA (`--features cuda`,
//! one process per GPU, `LOCAL_RANK` picks it) and wgpu/Vulkan (`--features wgpu`/`vulkan`)
//! in GPU builds. `precision = "bf16"` switches the device's default float type to bf16 (pure
//! bf16: parameters, activations and optimiser state) where the backend computes in it.

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
        "bf16" => {
            if !device.supports_dtype(FloatDType::BF16) {
                bail!("train.precision = \"bf16\": this device cannot compute in bf16; use \"fp32\"");
            }
            device.configure(FloatDType::BF16).map_err(|e| anyhow::anyhow!("train.precision = \"bf16\": {e:?}"))
        }
        other => bail!("train.precision = {other:?}: expected \"fp32\" or \"bf16\""),
    }
}
