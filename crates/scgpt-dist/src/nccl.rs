//! The NCCL backend: GPU collectives bootstrapped through the TCP rendezvous (which also keeps
//! carrying the barrier and the f64 metric sums, so those keep the TCP backend's timeouts and
//! rank-naming errors). Gradients are reduced in place in the training framework's own device
//! buffers ([`DeviceCollective`]); the host-slice [`Collective`] calls (initial parameters,
//! gathers, and gradients on a device NCCL cannot address) stage through device buffers.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::env::RankInfo;
use crate::tcp::{Tcp, TcpOptions};
use crate::{Collective, CommStats, DeviceCollective, DistError};

/// `ncclComm_t` is a raw pointer, so cudarc's `Comm` is not `Send`. NCCL allows a
/// communicator to be driven from any thread as long as calls on it are not concurrent, and
/// `&mut self` on every collective guarantees exactly that.
struct SendComm(Comm);
// SAFETY: see above; the communicator moves between threads but is never used by two at once.
unsafe impl Send for SendComm {}

/// GPU collectives through NCCL.
pub struct Nccl {
    comm: SendComm,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    tcp: Tcp,
    rank: usize,
    world: usize,
    // Device staging buffers, grown on demand and kept, so a training step does not
    // allocate device memory for every gradient exchange.
    dev_a: Option<CudaSlice<f32>>,
    dev_b: Option<CudaSlice<f32>>,
    calls: u64,
    bytes: u64,
    seconds: f64,
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> DistError {
    // NcclError's Debug prints only "NcclError"; the wrapped result code is the useful part.
    DistError::Backend(format!("NCCL {what} failed: {:?}", e.0))
}

fn cuda_err(what: &str, e: DriverError) -> DistError {
    DistError::Backend(format!("CUDA {what} failed: {e}"))
}

impl Nccl {
    /// Check the libraries, rendezvous over TCP, share rank 0's NCCL id and build the
    /// communicator on GPU `local_rank` (or the only visible GPU when the launcher already
    /// restricted `CUDA_VISIBLE_DEVICES` per rank).
    pub fn connect(info: &RankInfo, opts: &TcpOptions) -> Result<Nccl, DistError> {
        // CudaContext::new and the NCCL calls panic when their library cannot be loaded;
        // probe first so the user gets an actionable error instead.
        // SAFETY: only tries to dlopen the library; no CUDA call is made through it here.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DistError::Backend(
                "backend \"nccl\" needs the CUDA driver library (libcuda.so), which was not \
                 found: run on a GPU node with the NVIDIA driver installed, or use backend \"tcp\""
                    .to_string(),
            ));
        }
        // SAFETY: as above, a dlopen probe of libnccl.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(DistError::Backend(
                "backend \"nccl\" needs libnccl, which was not found on the library path. \
                 cudarc looks for `libnccl.so` (and a few versioned names, but not \
                 `libnccl.so.2`); the pip wheel nvidia-nccl-cu12 ships only libnccl.so.2, so \
                 create a symlink `libnccl.so -> libnccl.so.2` in a directory on \
                 LD_LIBRARY_PATH (e.g. inside site-packages/nvidia/nccl/lib) and add that \
                 directory to LD_LIBRARY_PATH"
                    .to_string(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| cuda_err("device count", e))?;
        let count = usize::try_from(count).unwrap_or(0);
        let ordinal =
            crate::gpu_ordinal(info.local_rank, Some(count)).map_err(|e| DistError::Backend(format!("rank {}: {e}", info.rank)))?;

        let mut tcp = Tcp::connect(info, opts)?;
        let mut id_bytes = [0u8; 128];
        let own_id = if info.rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal().iter()) {
                *b = *c as u8;
            }
            Some(id)
        } else {
            None
        };
        tcp.broadcast_bytes(&mut id_bytes)?;
        let id = own_id.unwrap_or_else(|| Id::uninit(id_bytes.map(|b| b as core::ffi::c_char)));

        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("context creation", e))?;
        // ncclCommInitRank picks the device from the thread's current context.
        ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream creation", e))?;
        let comm = Comm::from_rank(stream.clone(), info.rank, info.world, id).map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Nccl {
            comm: SendComm(comm),
            stream,
            ctx,
            tcp,
            rank: info.rank,
            world: info.world,
            dev_a: None,
            dev_b: None,
            calls: 0,
            bytes: 0,
            seconds: 0.0,
        })
    }

    fn staging(stream: &Arc<CudaStream>, slot: &mut Option<CudaSlice<f32>>, len: usize) -> Result<(), DistError> {
        if slot.as_ref().is_none_or(|s| s.len() < len) {
            *slot = None; // free the old buffer before allocating the larger one
            *slot = Some(stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| cuda_err("device allocation", e))?);
        }
        Ok(())
    }

    /// Upload `buf`, run `f` on the first `buf.len()` device elements, download in place.
    fn in_place(
        &mut self,
        buf: &mut [f32],
        what: &str,
        f: impl FnOnce(&Comm, &mut cudarc::driver::CudaViewMut<'_, f32>) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        if buf.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        self.ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        Nccl::staging(&self.stream, &mut self.dev_a, buf.len())?;
        let dev = self.dev_a.as_mut().expect("staging buffer");
        let mut view = dev.slice_mut(0..buf.len());
        self.stream.memcpy_htod(&*buf, &mut view).map_err(|e| cuda_err(&format!("{what} upload"), e))?;
        f(&self.comm.0, &mut view)?;
        self.stream.memcpy_dtoh(&view, buf).map_err(|e| cuda_err(&format!("{what} download"), e))?;
        self.stream.synchronize().map_err(|e| cuda_err(&format!("{what} synchronize"), e))?;
        self.calls += 1;
        self.bytes += std::mem::size_of_val(buf) as u64;
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.in_place(buf, "all_reduce_mean", |comm, view| {
            comm.all_reduce_in_place(view, &ReduceOp::Avg).map(|_| ()).map_err(|e| nccl_err("all_reduce (avg)", e))
        })
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), DistError> {
        // Metrics are a handful of scalars: the TCP path costs nothing and sums in a fixed
        // order, so logged losses are reproducible.
        self.tcp.all_reduce_sum_f64(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.in_place(buf, "broadcast", |comm, view| comm.broadcast_in_place(view, 0).map(|_| ()).map_err(|e| nccl_err("broadcast", e)))
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, DistError> {
        let n = local.len();
        let mut out = vec![0f32; n * self.world];
        if n == 0 {
            return Ok(out);
        }
        let t0 = Instant::now();
        self.ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        Nccl::staging(&self.stream, &mut self.dev_a, n)?;
        Nccl::staging(&self.stream, &mut self.dev_b, n * self.world)?;
        let send = self.dev_a.as_mut().expect("staging buffer");
        let mut send = send.slice_mut(0..n);
        self.stream.memcpy_htod(local, &mut send).map_err(|e| cuda_err("all_gather upload", e))?;
        let recv = self.dev_b.as_mut().expect("staging buffer");
        let mut recv = recv.slice_mut(0..n * self.world);
        self.comm.0.all_gather(&send, &mut recv).map_err(|e| nccl_err("all_gather", e))?;
        self.stream.memcpy_dtoh(&recv, out.as_mut_slice()).map_err(|e| cuda_err("all_gather download", e))?;
        self.stream.synchronize().map_err(|e| cuda_err("all_gather synchronize", e))?;
        self.calls += 1;
        self.bytes += std::mem::size_of_val(local) as u64;
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(out)
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        // Host-level barrier over TCP: it has timeouts, where an NCCL op on a dead rank hangs.
        self.tcp.barrier()
    }
    fn stats(&self) -> CommStats {
        let t = self.tcp.stats();
        CommStats {
            calls: self.calls + t.calls,
            bytes_sent: self.bytes + t.bytes_sent,
            bytes_received: self.bytes + t.bytes_received,
            seconds: self.seconds + t.seconds,
        }
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(self)
    }
}

impl DeviceCollective for Nccl {
    unsafe fn all_reduce_mean_device(&mut self, ptr: u64, len: usize) -> Result<(), DistError> {
        if len == 0 {
            return Ok(());
        }
        let t0 = Instant::now();
        self.ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        // SAFETY: the caller guarantees `ptr` addresses `len` f32 on this GPU that nothing else
        // touches during the call; the slice is leaked below, so cudarc never frees memory it
        // does not own.
        let mut view = unsafe { self.stream.upgrade_device_ptr::<f32>(ptr, len) };
        let reduced = self
            .comm
            .0
            .all_reduce_in_place(&mut view, &ReduceOp::Avg)
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce (avg, device buffer)", e));
        // Give the memory back to its owner: leaking only forgets the pointer (after waiting for
        // the slice's pending work), it frees nothing.
        let _ = view.leak();
        reduced?;
        self.stream.synchronize().map_err(|e| cuda_err("all_reduce synchronize", e))?;
        self.calls += 1;
        self.bytes += (len * std::mem::size_of::<f32>()) as u64;
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }
}
