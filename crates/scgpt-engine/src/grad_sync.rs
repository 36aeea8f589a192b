//! The data-parallel gradient exchange. Gradients are flattened on their own device into
//! buckets of at most [`BUCKET_FLOATS`] fp32 values (one `cat` per bucket, in parameter order,
//! a missing gradient as zeros), each bucket is averaged over the ranks, and the averages are
//! sliced back into the gradients in their own dtype.
//!
//! Where the collective can reduce accelerator memory ([`DeviceCollective`], NCCL) and the
//! bucket lives on a CUDA device, the bucket is reduced in place in burn's buffer: no host copy,
//! no per-parameter transfer. Otherwise (TCP between CPU ranks, or a device NCCL cannot address)
//! each bucket makes one round trip through a host buffer. Both give every rank the same values;
//! the TCP path's sums run in a fixed rank order, so 2 ranks reproduce 1 rank bit for bit where
//! the arithmetic allows (tests/train.rs).

use scgpt_dist::Collective;
use scgpt_model::burn::optim::GradientsParams;
use scgpt_model::burn::tensor::{DType, Device, Tensor, TensorData};

use crate::optim::{get_flat, register_flat, ParamEntry};

/// fp32 values per bucket (128 MiB): large enough that NCCL runs near its bus bandwidth, small
/// enough that the extra copy of the gradients a bucket holds stays a fraction of them.
pub const BUCKET_FLOATS: usize = 1 << 25;

/// Consecutive runs of `params` holding at most `limit` values each (a parameter larger than
/// `limit` is a bucket of its own).
pub fn buckets(params: &[ParamEntry], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, p) in params.iter().enumerate() {
        let n = p.numel();
        if i > start && size + n > limit {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < params.len() {
        out.push(start..params.len());
    }
    out
}

/// Replaces every gradient in `params` with its mean over the ranks of `comm`.
pub fn all_reduce_mean(
    grads: &mut GradientsParams,
    params: &[ParamEntry],
    comm: &mut dyn Collective,
    device: &Device,
) -> anyhow::Result<()> {
    all_reduce_mean_in_buckets(grads, params, comm, device, BUCKET_FLOATS)
}

/// [`all_reduce_mean`] with buckets of at most `limit` values.
pub fn all_reduce_mean_in_buckets(
    grads: &mut GradientsParams,
    params: &[ParamEntry],
    comm: &mut dyn Collective,
    device: &Device,
    limit: usize,
) -> anyhow::Result<()> {
    for range in buckets(params, limit) {
        let bucket = &params[range];
        let mut dtypes = Vec::with_capacity(bucket.len());
        let mut parts = Vec::with_capacity(bucket.len());
        for p in bucket {
            match get_flat(grads, p) {
                Some(g) => {
                    dtypes.push(g.dtype());
                    parts.push(if g.dtype() == DType::F32 { g } else { g.cast(DType::F32) });
                }
                None => {
                    dtypes.push(DType::F32);
                    parts.push(Tensor::<1>::zeros([p.numel()], (device, DType::F32)));
                }
            }
        }
        let flat = reduce_bucket(Tensor::cat(parts, 0), comm)?;
        let mut off = 0;
        for (p, dtype) in bucket.iter().zip(dtypes) {
            let n = p.numel();
            let g = flat.clone().slice(off..off + n);
            register_flat(grads, p, if dtype == DType::F32 { g } else { g.cast(dtype) });
            off += n;
        }
    }
    Ok(())
}

/// The mean over ranks of one fp32 bucket.
fn reduce_bucket(flat: Tensor<1>, comm: &mut dyn Collective) -> anyhow::Result<Tensor<1>> {
    #[cfg(feature = "cuda")]
    if let Some(dc) = comm.device() {
        if let Some(reduced) = cuda::reduce_in_place(&flat, dc)? {
            return Ok(reduced);
        }
    }
    let device = flat.device();
    let n = flat.dims()[0];
    let mut host =
        flat.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("gradient bucket to host: {e:?}"))?;
    comm.all_reduce_mean(&mut host)?;
    Ok(Tensor::<1>::from_data(TensorData::new(host, [n]), (&device, DType::F32)))
}

/// NCCL on burn's CUDA buffers. burn 0.22.1 exposes the backend primitive through
/// `Tensor::try_into_primitive` (`extension` feature). In CUDA builds the Cube backend is
/// `Fusion<CubeBackend>` (burn-cuda's default `fusion` feature): the fusion client runs what is
/// queued for the tensor and resolves it to cubecl's `CubeTensor`, whose client hands out the
/// CUDA allocation behind its handle (`get_resource`, the handle's offset included).
#[cfg(feature = "cuda")]
mod cuda {
    use burn_cubecl::CubeBackend;
    use cubecl_runtime::runtime::Runtime;
    use scgpt_dist::DeviceCollective;
    use scgpt_model::burn::backend::Cube;
    use scgpt_model::burn::tensor::{DType, Tensor};

    type CudaServer = <cubecl_cuda::CudaRuntime as Runtime>::Server;

    /// Reduces `flat` in place and returns it, or `None` when it does not live in CUDA memory
    /// (another backend, or a cubecl runtime other than CUDA), for the host path to take.
    pub(super) fn reduce_in_place(flat: &Tensor<1>, comm: &mut dyn DeviceCollective) -> anyhow::Result<Option<Tensor<1>>> {
        let len = flat.dims()[0];
        let Ok(fused) = flat.clone().try_into_primitive::<Cube>() else {
            return Ok(None);
        };
        // `flat` stays alive, so resolving this second reference leaves the buffer with it; the
        // resolve first runs whatever fusion still has queued for the tensor (the bucket's cat).
        let tensor = fused.client.clone().resolve_tensor_float::<CubeBackend>(fused);
        // NCCL reads `len` consecutive floats: a strided view (a bucket of one parameter can be
        // the gradient itself, reshaped) goes through the host instead.
        if !tensor.is_contiguous() || tensor.dtype != DType::F32 {
            return Ok(None);
        }
        // Everything queued on burn's streams has to finish before NCCL's stream reads the buffer.
        flat.device().sync().map_err(|e| anyhow::anyhow!("synchronising the device before the gradient all-reduce: {e:?}"))?;
        let Ok(resource) = tensor.client.get_resource::<CudaServer>(tensor.handle.clone()) else {
            return Ok(None);
        };
        let res = resource.resource();
        if (res.size as usize) < len * std::mem::size_of::<f32>() {
            anyhow::bail!("gradient bucket of {len} floats sits in a {}-byte CUDA allocation; refusing to reduce it in place", res.size);
        }
        // SAFETY: `res.ptr` is the start of this bucket's own allocation (the cat's fresh,
        // contiguous output, at least `len` f32 as checked above) on the device this rank's NCCL
        // communicator was built on (both follow `gpu_ordinal`); the device was synchronised
        // above and `resource` and `flat` keep the allocation alive until the call has returned.
        unsafe { comm.all_reduce_mean_device(res.ptr, len)? };
        drop(resource);
        Ok(Some(flat.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scgpt_dist::DistError;
    use scgpt_model::burn::module::ParamId;

    /// A collective of two ranks whose other rank holds `other` at every position: records the
    /// bucket lengths it was given and averages with `other`.
    struct TwoRanks {
        other: f32,
        lengths: Vec<usize>,
    }

    impl Collective for TwoRanks {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
            self.lengths.push(buf.len());
            buf.iter_mut().for_each(|x| *x = (*x + self.other) / 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&mut self, _buf: &mut [f64]) -> Result<(), DistError> {
            unreachable!()
        }
        fn broadcast(&mut self, _buf: &mut [f32]) -> Result<(), DistError> {
            unreachable!()
        }
        fn all_gather(&mut self, _local: &[f32]) -> Result<Vec<f32>, DistError> {
            unreachable!()
        }
        fn barrier(&mut self) -> Result<(), DistError> {
            unreachable!()
        }
    }

    #[test]
    fn buckets_average_every_gradient_keep_shapes_and_dtypes_and_fill_missing_ones() {
        let device = Device::flex();
        let params = vec![
            ParamEntry { path: "a".into(), id: ParamId::new(), shape: vec![2, 3] },
            ParamEntry { path: "b".into(), id: ParamId::new(), shape: vec![4] },
            ParamEntry { path: "c".into(), id: ParamId::new(), shape: vec![5] },
            ParamEntry { path: "d".into(), id: ParamId::new(), shape: vec![1, 2, 2] },
        ];
        let mut grads = GradientsParams::new();
        grads.register::<2>(params[0].id, Tensor::<2>::from_data([[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &device));
        grads.register::<1>(params[1].id, Tensor::<1>::from_data([8.0f32, -8.0, 0.5, 2.0], (&device, DType::BF16)));
        // "c" has no gradient on this rank (a frozen or unused parameter).
        grads.register::<3>(params[3].id, Tensor::<3>::from_data([[[1.0f32, 1.0], [3.0, 3.0]]], &device));
        let mut comm = TwoRanks { other: 1.0, lengths: Vec::new() };
        all_reduce_mean_in_buckets(&mut grads, &params, &mut comm, &device, 10).unwrap();
        assert_eq!(comm.lengths, vec![10, 9], "buckets of at most 10 values in parameter order");
        let a = grads.get::<2>(params[0].id).unwrap();
        assert_eq!(a.to_data().try_to_vec::<f32>().unwrap(), vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
        let b = grads.get::<1>(params[1].id).unwrap();
        assert_eq!(b.dtype(), DType::BF16, "a gradient comes back in its own dtype");
        assert_eq!(b.to_data().convert::<f32>().try_to_vec::<f32>().unwrap(), vec![4.5, -3.5, 0.75, 1.5]);
        let c = grads.get::<1>(params[2].id).unwrap();
        assert_eq!(c.to_data().try_to_vec::<f32>().unwrap(), vec![0.5; 5], "a missing gradient counts as zeros");
        let d = grads.get::<3>(params[3].id).unwrap();
        assert_eq!(d.dims(), [1, 2, 2]);
        assert_eq!(d.to_data().try_to_vec::<f32>().unwrap(), vec![1.0, 1.0, 2.0, 2.0]);
    }

    fn entry(n: usize) -> ParamEntry {
        ParamEntry { path: format!("p{n}"), id: ParamId::new(), shape: vec![n] }
    }

    #[test]
    fn buckets_cover_every_parameter_in_order_within_the_limit() {
        let params: Vec<ParamEntry> = [3, 4, 10, 1, 1, 2].into_iter().map(entry).collect();
        assert_eq!(buckets(&params, 8), vec![0..2, 2..3, 3..6]);
        assert_eq!(buckets(&params, 100), vec![0..6]);
        assert_eq!(buckets(&params, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6]);
        assert!(buckets(&[], 8).is_empty());
    }
}
