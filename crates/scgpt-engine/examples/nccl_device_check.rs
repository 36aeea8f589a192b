//! The trainer's gradient all-reduce on a CUDA build, checked and timed on a GPU node: gradients
//! of the whole-human model's shapes on the GPU, averaged by `grad_sync::all_reduce_mean` in place
//! in burn's buffers (NCCL), then through the host for comparison. One rank, or N ranks under
//! `launch/local.sh N` / Slurm (one GPU each): rank r fills its gradients with (r + 1) × a
//! pattern, so the mean is (N + 1) / 2 × the pattern on every rank.
//!
//!   cargo run --release -p scgpt-engine --features cuda --example nccl_device_check -- [reps]

use std::time::Instant;

use scgpt_dist::{connect, timeout_from_env, Collective, CommStats, DistError, RankInfo};
use scgpt_engine::grad_sync;
use scgpt_engine::optim::ParamEntry;
use scgpt_model::burn::module::ParamId;
use scgpt_model::burn::optim::GradientsParams;
use scgpt_model::burn::tensor::{Device, Tensor, TensorData};

/// The collective with its device path hidden: the host round trip of each bucket.
struct HostOnly<'a>(&'a mut dyn Collective);

impl Collective for HostOnly<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.0.all_reduce_mean(buf)
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), DistError> {
        self.0.all_reduce_sum_f64(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.0.broadcast(buf)
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, DistError> {
        self.0.all_gather(local)
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        self.0.barrier()
    }
    fn stats(&self) -> CommStats {
        self.0.stats()
    }
}

/// The whole-human model's parameter shapes (vocabulary 60,697, d 512, 12 layers).
fn whole_human_params() -> Vec<ParamEntry> {
    let mut shapes = vec![vec![60_697, 512], vec![512], vec![512]];
    for _ in 0..12 {
        shapes.extend([vec![1536, 512], vec![1536], vec![512, 512], vec![512], vec![512, 512], vec![512], vec![512, 512], vec![512]]);
        shapes.extend([vec![512], vec![512], vec![512], vec![512]]);
    }
    shapes.extend([vec![512, 512], vec![512], vec![1, 512], vec![1]]);
    shapes.into_iter().enumerate().map(|(i, shape)| ParamEntry { path: format!("p{i}"), id: ParamId::new(), shape }).collect()
}

fn pattern(n: usize, offset: usize) -> Vec<f32> {
    (0..n).map(|i| ((i + offset) % 1000) as f32 * 0.25).collect()
}

fn fill(params: &[ParamEntry], scale: f32, device: &Device) -> GradientsParams {
    let mut grads = GradientsParams::new();
    let mut off = 0;
    for p in params {
        let n = p.numel();
        let values: Vec<f32> = pattern(n, off).into_iter().map(|x| x * scale).collect();
        grads.register::<1>(p.id, Tensor::<1>::from_data(TensorData::new(values, [n]), device));
        off += n;
    }
    grads
}

fn check(grads: &GradientsParams, params: &[ParamEntry], scale: f32) -> Result<(), String> {
    let mut off = 0;
    for p in params {
        let n = p.numel();
        let got = grads.get::<1>(p.id).ok_or_else(|| format!("{}: gradient missing", p.path))?;
        let got = got.into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        let want: Vec<f32> = pattern(n, off).into_iter().map(|x| x * scale).collect();
        if let Some(i) = (0..n).find(|&i| (got[i] - want[i]).abs() > 1e-3 * want[i].abs().max(1.0)) {
            return Err(format!("{}[{i}] = {} where the mean is {}", p.path, got[i], want[i]));
        }
        off += n;
    }
    Ok(())
}

fn main() {
    let reps: usize = std::env::args().nth(1).map(|a| a.parse().expect("a number of repetitions")).unwrap_or(5);
    let fail = |msg: String| -> ! {
        eprintln!("nccl_device_check: FAIL: {msg}");
        std::process::exit(1);
    };
    let info = RankInfo::from_env().unwrap_or_else(|e| fail(e.to_string()));
    let timeout = timeout_from_env().unwrap_or_else(|e| fail(e.to_string()));
    let mut comm = connect(&info, "nccl", timeout).unwrap_or_else(|e| fail(e.to_string()));
    let device = scgpt_engine::device::select("cuda", info.local_rank).unwrap_or_else(|e| fail(e.to_string()));
    let params = whole_human_params();
    let floats: usize = params.iter().map(ParamEntry::numel).sum();
    let (rank, world) = (comm.rank(), comm.world());
    let mean = (world as f32 + 1.0) / 2.0;
    for path in ["device", "host"] {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let mut grads = fill(&params, rank as f32 + 1.0, &device);
            device.sync().unwrap_or_else(|e| fail(format!("{e:?}")));
            let t = Instant::now();
            let done = match path {
                "device" => grad_sync::all_reduce_mean(&mut grads, &params, comm.as_mut(), &device),
                _ => grad_sync::all_reduce_mean(&mut grads, &params, &mut HostOnly(comm.as_mut()), &device),
            };
            done.unwrap_or_else(|e| fail(format!("{path} path: {e:#}")));
            device.sync().unwrap_or_else(|e| fail(format!("{e:?}")));
            best = best.min(t.elapsed().as_secs_f64());
            check(&grads, &params, mean).unwrap_or_else(|e| fail(format!("{path} path, rank {rank}: {e}")));
        }
        if rank == 0 {
            println!(
                "nccl_device_check: PASS: {path} path, world {world}, {floats} floats ({:.0} MB) in {} parameters, best {best:.4} s",
                floats as f64 * 4.0 / 1e6,
                params.len()
            );
        }
    }
}
