//! Data-parallel collectives for scgpt-train, on plain host buffers (`&mut [f32]`), so the
//! crate needs no tensor library and the trainer decides when to flatten gradients.
//!
//! Three backends implement [`Collective`]:
//!
//! * [`Single`]: one process; every operation is the identity.
//! * [`Tcp`]: CPU ranks over blocking std sockets, star topology through rank 0.
//! * `Nccl` (feature `nccl`): GPU ranks; NCCL moves the data, the TCP rendezvous carries
//!   NCCL's unique id and the small metric reductions.
//!
//! # TCP protocol (version [`PROTOCOL_VERSION`])
//!
//! Rank 0 listens on `MASTER_PORT` (all interfaces) and accepts `world - 1` connections until
//! the connect timeout; peers retry their connect with backoff because they may start first.
//! Each peer opens with a handshake `magic, version, rank, world`; rank 0 rejects (and fails
//! the whole group) on a version or world-size disagreement or a rank claimed twice, silently
//! drops connections that do not speak the protocol (health checks, port scanners), and once
//! everyone is in answers each peer with a welcome carrying the magic back.
//!
//! Every collective starts with a 17-byte request from each peer: `op, sequence number,
//! element count`. Rank 0 checks all of them against its own call, so ranks that issue
//! different collectives (a program bug that would otherwise exchange garbage) fail loudly.
//! Data then moves in chunks (4 MiB by default) so memory stays bounded:
//!
//! * reductions: for each chunk, rank 0 reads that chunk from ranks 1, 2, ... in rank order,
//!   sums in f64 starting from its own values, rounds once, and sends the same bytes to every
//!   peer. The fixed order makes the result deterministic and every rank ends bit-identical.
//!   Peers send from a helper thread while they receive, so the upload of chunk k+1 overlaps
//!   the reduction of chunk k.
//! * broadcast / barrier: rank 0 streams its buffer (empty for a barrier) to every peer.
//! * all_gather: rank 0 collects every peer's buffer in rank order and streams the
//!   concatenation back.
//!
//! Every reply chunk from rank 0 is preceded by a tag byte, so rank 0 can replace any chunk
//! with an abort frame `(kind, culprit rank, message)`. A peer that dies, closes its socket or
//! stays silent past the timeout is therefore reported by name on *every* rank, not only on
//! rank 0. Peers wait a little longer than rank 0 ([`TcpOptions::peer_timeout`]) so that this
//! diagnosis reaches them before their own timer blames rank 0. After any failure the group
//! is poisoned: later calls fail at once with [`DistError::Poisoned`], because the ranks no
//! longer agree on where they are in the stream.
//!
//! All numbers on the wire are little endian.

mod env;
#[cfg(feature = "nccl")]
mod nccl;
mod tcp;
mod wire;

use std::time::Duration;

pub use env::{expand_nodelist, gpu_ordinal, timeout_from_env, timeout_from_env_with, visible_gpus, RankInfo};
pub use env::{DEFAULT_MASTER_PORT, DEFAULT_TIMEOUT, TIMEOUT_ENV};
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use tcp::{Tcp, TcpOptions, DEFAULT_CHUNK_BYTES, PROTOCOL_VERSION};

/// Errors of the distributed layer. Messages are meant to be shown to the user as they are:
/// they name the rank, the operation and the likely fix.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Launcher variables or backend choice are inconsistent.
    #[error("{0}")]
    Config(String),
    /// A specific rank failed, went silent or could not be reached.
    #[error("{message}")]
    Rank { rank: usize, op: &'static str, message: String },
    /// The ranks disagree (handshake or collective call sequence).
    #[error("{0}")]
    Protocol(String),
    /// The accelerator backend is unavailable or failed.
    #[error("{0}")]
    Backend(String),
    /// A local socket operation failed (binding the rendezvous port, ...).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An earlier collective failed; the group cannot be used any more.
    #[error("the process group is unusable after an earlier failure ({0}); restart every rank")]
    Poisoned(String),
}

impl DistError {
    /// The rank this error blames, when it blames one.
    pub fn rank(&self) -> Option<usize> {
        match self {
            DistError::Rank { rank, .. } => Some(*rank),
            _ => None,
        }
    }
}

/// Communication accounting, cumulative since the collective was created. Take two snapshots
/// and subtract them ([`CommStats::since`]) to get the share of a training step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Collective calls made.
    pub calls: u64,
    /// Bytes this rank wrote to the network (payload and protocol headers).
    pub bytes_sent: u64,
    /// Bytes this rank read from the network.
    pub bytes_received: u64,
    /// Wall-clock seconds spent inside collective calls, waiting for slower ranks included.
    pub seconds: f64,
}

impl CommStats {
    /// The difference `self - earlier`.
    pub fn since(&self, earlier: &CommStats) -> CommStats {
        CommStats {
            calls: self.calls.saturating_sub(earlier.calls),
            bytes_sent: self.bytes_sent.saturating_sub(earlier.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
            seconds: (self.seconds - earlier.seconds).max(0.0),
        }
    }
}

/// The collective operations the data-parallel trainer needs. Every rank must call the same
/// operations in the same order with the same lengths; backends detect violations where they
/// can instead of hanging.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In-place mean over ranks (every rank ends with the identical result, bit for bit).
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), DistError>;
    /// In-place sum of f64 scalars (metrics: loss sums, counts).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Rank 0's buffer copied to every rank (initial parameters).
    fn broadcast(&mut self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Concatenation of every rank's buffer in rank order (each rank gives the same length).
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, DistError>;
    fn barrier(&mut self) -> Result<(), DistError>;
    /// Cumulative communication accounting; backends that do not measure report zeros.
    fn stats(&self) -> CommStats {
        CommStats::default()
    }
    /// Short backend name for logs ("single", "tcp", "nccl").
    fn backend(&self) -> &'static str {
        "custom"
    }
    /// The same group's collectives on accelerator memory, where the backend has them (NCCL):
    /// the trainer then reduces gradient buckets where they are instead of through the host.
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        None
    }
}

/// Collectives on buffers in the accelerator's memory, addressed by raw device pointers, so a
/// tensor library's buffers are reduced in place without a host copy. Every rank must make the
/// same calls in the same order, as with [`Collective`].
pub trait DeviceCollective {
    /// In-place mean over ranks of `len` f32 at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must address at least `len` f32 of memory on the GPU this collective was built
    /// on, and nothing may read or write that memory until the call returns: the work that
    /// produced it must be complete (the caller synchronises its own streams first). The call
    /// returns once the reduced values are in place.
    unsafe fn all_reduce_mean_device(&mut self, ptr: u64, len: usize) -> Result<(), DistError>;
}

/// One process, world size 1: every collective is the identity.
#[derive(Debug, Default)]
pub struct Single {
    stats: CommStats,
}

impl Single {
    pub fn new() -> Single {
        Single::default()
    }
}

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<(), DistError> {
        self.stats.calls += 1;
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _buf: &mut [f64]) -> Result<(), DistError> {
        self.stats.calls += 1;
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32]) -> Result<(), DistError> {
        self.stats.calls += 1;
        Ok(())
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, DistError> {
        self.stats.calls += 1;
        Ok(local.to_vec())
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        self.stats.calls += 1;
        Ok(())
    }
    fn stats(&self) -> CommStats {
        self.stats
    }
    fn backend(&self) -> &'static str {
        "single"
    }
}

/// Backend names accepted by [`connect`].
pub const BACKENDS: &[&str] = &["auto", "single", "tcp", "nccl"];

/// Build the collective for a backend name: "single", "tcp", "nccl" (an error unless the
/// crate was built with the `nccl` feature), or "auto" (single when `world == 1`, tcp
/// otherwise; GPU trainers should ask for "nccl" explicitly). `timeout` bounds both the
/// rendezvous and every later network wait.
pub fn connect(info: &RankInfo, backend: &str, timeout: Duration) -> Result<Box<dyn Collective>, DistError> {
    let opts = TcpOptions::with_timeout(timeout);
    match backend.trim().to_ascii_lowercase().as_str() {
        "auto" if info.world == 1 => Ok(Box::new(Single::new())),
        "auto" | "tcp" => Ok(Box::new(Tcp::connect(info, &opts)?)),
        "single" if info.world == 1 => Ok(Box::new(Single::new())),
        "single" => Err(DistError::Config(format!(
            "backend \"single\" was requested but the launcher reports a world of {} ranks \
             (rank {}): every process would train alone; use backend \"tcp\"/\"nccl\"/\"auto\", \
             or launch a single process",
            info.world, info.rank
        ))),
        "nccl" => connect_nccl(info, &opts),
        other => Err(DistError::Config(format!("unknown distributed backend {other:?}: expected one of {}", BACKENDS.join(", ")))),
    }
}

#[cfg(feature = "nccl")]
fn connect_nccl(info: &RankInfo, opts: &TcpOptions) -> Result<Box<dyn Collective>, DistError> {
    Ok(Box::new(Nccl::connect(info, opts)?))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(_info: &RankInfo, _opts: &TcpOptions) -> Result<Box<dyn Collective>, DistError> {
    Err(DistError::Config(
        "backend \"nccl\" is not compiled in: rebuild with `--features nccl` \
         (scgpt-dist/nccl), or use backend \"tcp\""
            .to_string(),
    ))
}
