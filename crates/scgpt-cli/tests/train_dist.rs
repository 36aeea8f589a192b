//! Data-parallel `scgpt-train` over TCP on loopback: N ranks as N processes (launched as
//! torchrun would, with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) with the same global
//! batch end with the parameters of one rank, also with gradient accumulation and across a
//! resume; a killed rank makes the others fail with an error naming it.

use std::path::Path;

mod common;
use common::{prep, root};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One rank of a `world`-rank run (world 1 = a plain process).
fn spawn_rank(rank: usize, world: usize, port: u16, run: &Path, shards: &Path, sets: &[String]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_scgpt-train"));
    c.arg("--config").arg(root().join("configs/pretrain_tiny.toml")).arg("--quiet");
    let base = [
        format!("run.dir={}", run.display()),
        format!("data.shards=[\"{}\"]", shards.display()),
        "valid.label_set=\"\"".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.max_seq_len=64".into(),
        "model.dropout=0.0".into(),
        "run.deterministic=true".into(),
        "run.threads=1".into(),
        "train.warmup_steps=2".into(),
        "train.lr=1e-3".into(),
        "train.log_every=1".into(),
        "train.eval_every=1000".into(),
        "train.save_every=1000".into(),
        "dist.timeout_s=5".into(),
    ];
    for s in base.iter().chain(sets) {
        c.arg("--set").arg(s);
    }
    if world > 1 {
        c.env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn run_world(world: usize, run: &Path, shards: &Path, sets: &[String]) {
    let port = free_port();
    let children: Vec<Child> = (0..world).map(|r| spawn_rank(r, world, port, run, shards, sets)).collect();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r} of {world} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn final_params(run: &Path) -> Vec<f32> {
    let (_, dir) = scgpt_engine::latest_checkpoint(run).expect("a checkpoint");
    let ck = scgpt_model::load_native(dir.join("model"), &scgpt_model::burn::tensor::Device::flex()).unwrap();
    let p = scgpt_engine::optim::list_params(&ck.model).unwrap();
    scgpt_engine::optim::flatten_params(&ck.model, &p)
}

/// Worst absolute parameter difference.
fn worst_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn ranks_with_the_same_global_batch_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let steps = "train.max_steps=5".to_string();
    let one = tmp.path().join("one");
    run_world(1, &one, &shards, &[steps.clone(), "train.batch_size=16".into()]);
    let want = final_params(&one);

    // 2 ranks × 8 cells, 4 ranks × 4 cells, 2 ranks × 4 cells × 2 micro-batches.
    for (world, batch, accum) in [(2, 8, 1), (4, 4, 1), (2, 4, 2)] {
        let run = tmp.path().join(format!("w{world}a{accum}"));
        run_world(world, &run, &shards, &[steps.clone(), format!("train.batch_size={batch}"), format!("train.grad_accum={accum}")]);
        let got = final_params(&run);
        let worst = worst_difference(&want, &got);
        // Adam moves a parameter by about lr per step whatever the gradient's size, so
        // reduction-order noise in tiny gradients can move a parameter by up to ~lr·steps;
        // anything structural (a rank's cells missing or doubled) shows as far larger errors.
        eprintln!("world {world}, accum {accum}: worst parameter difference {worst:e}");
        assert!(worst < 3e-5, "world {world}, accum {accum}: worst parameter difference {worst:e}");
    }

    // Across a resume: 2 ranks stop at step 2 with a checkpoint, the same ranks resume to 5.
    let run = tmp.path().join("resumed");
    run_world(2, &run, &shards, &[steps.clone(), "train.batch_size=8".into(), "run.stop_at_step=2".into()]);
    assert_eq!(scgpt_engine::latest_checkpoint(&run).unwrap().0, 2);
    run_world(2, &run, &shards, &[steps, "train.batch_size=8".into()]);
    assert_eq!(scgpt_engine::latest_checkpoint(&run).unwrap().0, 5);
    let worst = worst_difference(&want, &final_params(&run));
    assert!(worst < 3e-5, "resumed 2-rank run: worst parameter difference {worst:e}");
}

/// Two ranks of an endless run on shards under `dir`, once `steps` steps are logged; returns the
/// run directory and both children.
fn two_ranks_running(dir: &Path, steps: usize) -> (std::path::PathBuf, Child, Child) {
    let shards = dir.join("shards");
    prep(&shards);
    let run = dir.join("run");
    let port = free_port();
    let sets = ["train.max_steps=100000".to_string(), "train.batch_size=4".into()];
    let r0 = spawn_rank(0, 2, port, &run, &shards, &sets);
    let r1 = spawn_rank(1, 2, port, &run, &shards, &sets);
    let start = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0) < steps {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    (run, r0, r1)
}

#[test]
fn a_killed_rank_ends_the_others_with_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_run, mut r0, mut r1) = two_ranks_running(tmp.path(), 2);
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = Instant::now();
    let out = loop {
        if r0.try_wait().unwrap().is_some() {
            break r0.wait_with_output().unwrap();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = r0.kill();
            panic!("rank 0 still running 30 s after rank 1 died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("rank 1"), "{stderr}");
    eprintln!("rank 0 exited {:.1} s after rank 1 was killed: {}", killed.elapsed().as_secs_f64(), stderr.lines().last().unwrap_or(""));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A stop signal (SIGTERM, as Slurm sends before a time limit) that reaches one rank only stops
/// both at the same step with one checkpoint, and the same two commands resume from it.
#[test]
fn sigterm_to_one_rank_stops_every_rank_at_one_checkpoint_and_they_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, r0, r1) = two_ranks_running(tmp.path(), 3);
    // SAFETY: kill(2) on our own child's pid; no memory is touched.
    unsafe {
        libc_kill(r1.id() as i32, 15);
    }
    let signalled = Instant::now();
    let outs: Vec<_> = [r0, r1].into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    assert!(signalled.elapsed() < Duration::from_secs(30), "ranks took {:?} to stop", signalled.elapsed());
    for (r, out) in outs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + 15), "rank {r}: {stderr}");
        assert!(stderr.contains("checkpoint written"), "rank {r}: {stderr}");
    }
    let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(ckpts.len(), 1, "one checkpoint: {ckpts:?}");
    let (stopped_at, _) = scgpt_engine::latest_checkpoint(&run).expect("a checkpoint");
    assert!(stopped_at >= 3, "stopped at {stopped_at}");

    // The same two commands, with a nearer end, resume from that step and finish.
    let end = [format!("train.max_steps={}", stopped_at + 2), "train.batch_size=4".into()];
    run_world(2, &run, &tmp.path().join("shards"), &end);
    assert_eq!(scgpt_engine::latest_checkpoint(&run).unwrap().0, stopped_at + 2);
}

#[test]
fn launch_local_sh_runs_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let run = tmp.path().join("run");
    let out = Command::new("bash")
        .arg(root().join("launch/local.sh"))
        .arg("2")
        .arg("--config")
        .arg(root().join("configs/pretrain_tiny.toml"))
        .args(["--quiet", "--set"])
        .arg(format!("run.dir={}", run.display()))
        .arg("--set")
        .arg(format!("data.shards=[\"{}\"]", shards.display()))
        .args(["--set", "valid.label_set=\"\"", "--set", "model.embsize=32", "--set", "model.nheads=2", "--set", "model.d_hid=32"])
        .args(["--set", "model.max_seq_len=64", "--set", "train.batch_size=4", "--set", "train.max_steps=3"])
        .env("SCGPT_TRAIN", env!("CARGO_BIN_EXE_scgpt-train"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 0 of 2"), "{stderr}");
    assert_eq!(scgpt_engine::latest_checkpoint(&run).unwrap().0, 3);
}

#[test]
fn cce_contrasts_the_global_batch_across_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let mlm = ["train.objective=\"mlm\"".to_string(), "train.cce=true".into(), "train.max_steps=4".into()];
    let one = tmp.path().join("one");
    run_world(1, &one, &shards, &[&mlm[..], &["train.batch_size=16".into()]].concat());
    let two = tmp.path().join("two");
    run_world(2, &two, &shards, &[&mlm[..], &["train.batch_size=8".into()]].concat());
    let cce = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss_cce"].as_f64())
            .collect()
    };
    let (a, b) = (cce(&one), cce(&two));
    assert_eq!(a.len(), 4);
    // Over 16 cells the loss starts near ln 16; over 8 it would be near ln 8.
    assert!((a[0] - b[0]).abs() < 1e-4 * a[0], "step 1 CCE: one rank {} vs two ranks {}", a[0], b[0]);
    let worst = worst_difference(&final_params(&one), &final_params(&two));
    eprintln!("MLM + CCE, 2 ranks vs 1: worst parameter difference {worst:e}");
    assert!(worst < 3e-5, "worst parameter difference {worst:e}");
}

#[test]
fn annotation_on_two_ranks_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("unused");
    let task = [
        format!("data.input=\"{}\"", root().join("tests/data/pbmc68k_reduced.h5ad").display()),
        "data.allow_non_integer=true".into(),
        "task.kind=\"annotation\"".into(),
        "task.label_col=\"bulk_labels\"".into(),
        "model.MVC=false".into(),
        "train.max_steps=4".into(),
    ];
    let one = tmp.path().join("one");
    run_world(1, &one, &shards, &[&task[..], &["train.batch_size=16".into()]].concat());
    let two = tmp.path().join("two");
    run_world(2, &two, &shards, &[&task[..], &["train.batch_size=8".into()]].concat());
    let cls = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss_cls"].as_f64())
            .collect()
    };
    let (a, b) = (cls(&one), cls(&two));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "cross entropy: one rank {a:?} vs two ranks {b:?}");
    }
    let worst = worst_difference(&final_params(&one), &final_params(&two));
    eprintln!("annotation, 2 ranks vs 1: worst parameter difference {worst:e}");
    assert!(worst < 3e-5, "worst parameter difference {worst:e}");
}

/// Integration (DSBN, DAR, ECS, zero probabilities, single-batch minibatches): two ranks of 8
/// cells each take the same micro-batches as one rank accumulating two of 8 (DSBN and ECS
/// work per micro-batch, so the micro-batches, not just the step's cells, must agree).
#[test]
fn integration_on_two_ranks_matches_one_rank_with_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("unused");
    let task = [
        format!("data.input=\"{}\"", root().join("tests/data/pbmc68k_reduced.h5ad").display()),
        "data.allow_non_integer=true".into(),
        "data.batch_col=\"phase\"".into(),
        "data.single_batch_minibatches=true".into(),
        "data.shuffle_window=1000".into(),
        "task.kind=\"integration\"".into(),
        "task.include_zero_gene=true".into(),
        "model.MVC=true".into(),
        "model.DAR=true".into(),
        "model.explicit_zero_prob=true".into(),
        "model.domain_spec_batchnorm=\"dsbn\"".into(),
        "model.use_batch_labels=true".into(),
        "train.ecs=true".into(),
        "train.max_steps=4".into(),
        "train.batch_size=8".into(),
    ];
    let one = tmp.path().join("one");
    run_world(1, &one, &shards, &[&task[..], &["train.grad_accum=2".into()]].concat());
    let two = tmp.path().join("two");
    run_world(2, &two, &shards, &task);
    let gep = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss_gep"].as_f64())
            .collect()
    };
    let (a, b) = (gep(&one), gep(&two));
    assert!(!a.is_empty() && a.len() == b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "GEP: one rank {a:?} vs two ranks {b:?}");
    }
    // BatchNorm running statistics are each rank's own (as PyTorch DDP without SyncBatchNorm;
    // rank 0's are saved): only trained parameters are compared.
    let trained = |run: &Path| {
        let (_, dir) = scgpt_engine::latest_checkpoint(run).expect("a checkpoint");
        let ck = scgpt_model::load_native(dir.join("model"), &scgpt_model::burn::tensor::Device::flex()).unwrap();
        let p = scgpt_engine::optim::list_params(&ck.model).unwrap();
        let flat = scgpt_engine::optim::flatten_params(&ck.model, &p);
        let mut at = 0;
        let mut out = Vec::new();
        for e in &p {
            if !e.path.contains("running_") {
                out.extend_from_slice(&flat[at..at + e.numel()]);
            }
            at += e.numel();
        }
        out
    };
    let (pa, pb) = (trained(&one), trained(&two));
    let worst = worst_difference(&pa, &pb);
    eprintln!("integration, 2 ranks vs 1 rank with accumulation: worst parameter difference {worst:e}");
    assert!(worst < 3e-5, "worst parameter difference {worst:e}");
}

/// Perturbation (the generator, control pairing, sampled genes that keep the perturbed ones):
/// two ranks of 8 cells each take the same micro-batches as one rank accumulating two of 8, so
/// the pairings and gene samples, keyed by the cells' global positions, agree.
#[test]
fn perturbation_on_two_ranks_matches_one_rank_with_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let screen = tmp.path().join("screen.h5ad");
    let status = Command::new(common::prep_bin())
        .args([
            "simulate-perturbation",
            "--genes",
            "60",
            "--perturbed-genes",
            "10",
            "--doubles",
            "8",
            "--cells-per-condition",
            "10",
            "--control-cells",
            "80",
            "--targets-per-gene",
            "5",
            "--quiet",
            "--out",
        ])
        .arg(&screen)
        .status()
        .unwrap();
    assert!(status.success());
    let shards = tmp.path().join("unused");
    let task = [
        format!("data.input=\"{}\"", screen.display()),
        "data.gene_col=\"gene_name\"".into(),
        "data.shuffle_window=1000".into(),
        "data.valid_fraction=0.0".into(),
        "task.kind=\"perturbation\"".into(),
        "model.MVC=false".into(),
        "model.pad_value=0.0".into(),
        "model.max_seq_len=40".into(),
        "train.max_steps=4".into(),
        "train.batch_size=8".into(),
    ];
    let one = tmp.path().join("one");
    run_world(1, &one, &shards, &[&task[..], &["train.grad_accum=2".into()]].concat());
    let two = tmp.path().join("two");
    run_world(2, &two, &shards, &task);
    let mse = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss_mse"].as_f64())
            .collect()
    };
    let (a, b) = (mse(&one), mse(&two));
    assert!(!a.is_empty() && a.len() == b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "MSE: one rank {a:?} vs two ranks {b:?}");
    }
    let params = |run: &Path| {
        let (_, dir) = scgpt_engine::latest_checkpoint(run).expect("a checkpoint");
        let (m, _) = scgpt_model::io::perturbation_checkpoint::load_native_perturbation(
            dir.join("model"),
            &scgpt_model::burn::tensor::Device::flex(),
        )
        .unwrap();
        let p = scgpt_engine::optim::list_params(&m).unwrap();
        scgpt_engine::optim::flatten_params(&m, &p)
    };
    let worst = worst_difference(&params(&one), &params(&two));
    eprintln!("perturbation, 2 ranks vs 1 rank with accumulation: worst parameter difference {worst:e}");
    assert!(worst < 3e-5, "worst parameter difference {worst:e}");
}
