//! `scgpt-train` as a user runs it: config file + `--set`, SIGTERM writes a checkpoint and the
//! same command resumes and finishes; the result embeds with `scgpt embed`.

use std::path::Path;

mod common;
use common::{prep, prep_bin, root};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn train_cmd(run: &Path, shards: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_scgpt-train"));
    c.arg("--config").arg(root().join("configs/pretrain_tiny.toml")).arg("--quiet");
    for s in [
        format!("run.dir={}", run.display()),
        format!("data.shards=[\"{}\"]", shards.display()),
        format!("valid.label_set={}", shards.display()),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.max_seq_len=64".into(),
        "train.log_every=1".into(),
        "run.threads=2".into(),
    ]
    .iter()
    .map(String::as_str)
    .chain(extra.iter().copied())
    {
        c.arg("--set").arg(s);
    }
    c
}

#[test]
fn sigterm_checkpoints_and_the_same_command_resumes() {
    if !prep_bin().is_file() {
        panic!("{} not built: run `cargo test --workspace` (it builds scgpt-prep)", prep_bin().display());
    }
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prep(&shards);
    let run = tmp.path().join("run");
    let extra = ["train.max_steps=400", "train.save_every=1000", "train.eval_every=1000"];
    let mut child = train_cmd(&run, &shards, &extra).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until a few steps are logged, then ask it to stop as Slurm would.
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(run.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "no progress logged");
        assert!(child.try_wait().unwrap().is_none(), "scgpt-train exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child's pid; no memory is touched.
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("checkpoint written"), "{stderr}");
    let (stopped_at, _) = scgpt_engine::latest_checkpoint(&run).expect("a checkpoint after SIGTERM");
    assert!((3..400).contains(&stopped_at), "stopped at {stopped_at}");

    // The command again resumes from there (here with a nearer end, to keep the test short).
    let end = format!("train.max_steps={}", stopped_at + 3);
    let out = train_cmd(&run, &shards, &["train.save_every=1000", "train.eval_every=1000", &end]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from") && stderr.contains(&format!("step {stopped_at}")), "{stderr}");
    assert_eq!(scgpt_engine::latest_checkpoint(&run).unwrap().0, stopped_at + 3);

    // The exported best model embeds with `scgpt embed`.
    let emb = tmp.path().join("emb.npy");
    let out = Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .arg("embed")
        .arg("--model")
        .arg(run.join("best_model"))
        .arg("--input")
        .arg(root().join("tests/data/wu2020_200.h5ad"))
        .arg("--output")
        .arg(&emb)
        .args(["--format", "npy", "--deterministic"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&emb).unwrap().len() > 200 * 32 * 4);
}

#[test]
fn bad_config_is_an_error_naming_the_key_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[train]\nbatchsize = 4\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_scgpt-train")).arg("--config").arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("`train.batchsize`") && stderr.contains("bad.toml"), "{stderr}");
    assert!(!stderr.contains("batchsize.batchsize"), "the key is named once: {stderr}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn plan_prints_memory_and_batch_without_data() {
    // pretrain_human.toml names census shards that do not exist here: --plan must not open them.
    let out = Command::new(env!("CARGO_BIN_EXE_scgpt-train"))
        .args(["--config"])
        .arg(root().join("configs/pretrain_human.toml"))
        .args(["--plan", "--gpu-mem", "80GB"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The whole-human model: 60,697 tokens, d 512, 12 layers (51,857,922 parameters).
    assert!(text.contains("51.9M parameters"), "{text}");
    assert!(text.contains("attention blockwise"), "{text}");
    assert!(text.contains("train.batch_size = 32, train.grad_accum = 1"), "{text}");
    // Explicit attention at fp32 cannot hold 32 cells on 80 GB: the plan splits the step.
    let out = Command::new(env!("CARGO_BIN_EXE_scgpt-train"))
        .args(["--config"])
        .arg(root().join("configs/pretrain_human.toml"))
        .args(["--plan", "--gpu-mem", "80GB", "--set", "run.attention=\"explicit\""])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("train.grad_accum = 2"), "{text}");
    let bad = Command::new(env!("CARGO_BIN_EXE_scgpt-train")).args(["--plan", "--gpu-mem", "lots"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--gpu-mem"), "names the flag");
}
