//! `scgpt-train --config configs/pretrain_human.toml [--set section.key=value ...]`
//!
//! Pretraining with the original's generative objective (or masked values), one process per
//! rank. Rerunning the same command resumes from the newest checkpoint of `run.dir`;
//! SIGTERM/SIGINT write a checkpoint and exit (Slurm preemption).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use scgpt_engine::config::TaskKind;
use scgpt_engine::{RunEnd, Trainer};

#[derive(Debug, Parser)]
#[command(
    name = "scgpt-train",
    version,
    about = "scGPT training: pretraining (generative or masked-value) and fine-tuning (annotation, integration, perturbation) from one TOML"
)]
struct Cli {
    /// Experiment TOML (configs/); the embedded default is configs/pretrain_tiny.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key: --set train.lr=5e-5 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Print the memory and compute plan (parameters, gradients, optimiser state, activations,
    /// FLOPs) without opening the data or training, and exit.
    #[arg(long)]
    plan: bool,
    /// With --plan: one GPU's memory (80GB, 80GiB, 40960MiB); adds the largest micro-batch that
    /// fits and the grad_accum that keeps the config's cells per step.
    #[arg(long, value_name = "SIZE", requires = "plan")]
    gpu_mem: Option<String>,
}

fn main() -> ExitCode {
    scgpt_data::alloc::tune_for_tensors();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(RunEnd::Finished { steps }) => {
            eprintln!("scgpt-train: finished after {steps} steps");
            ExitCode::SUCCESS
        }
        Ok(RunEnd::Interrupted { steps, signal: 0 }) => {
            eprintln!("scgpt-train: stopped at step {steps} (run.stop_at_step); checkpoint written, rerun without it to continue");
            ExitCode::SUCCESS
        }
        Ok(RunEnd::Interrupted { steps, signal }) => {
            eprintln!("scgpt-train: stopped by signal {signal} at step {steps}; checkpoint written, rerun the same command to resume");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<RunEnd> {
    let cfg = scgpt_engine::config::resolve(cli.config.as_deref(), &cli.sets)?;
    if cli.print_config {
        println!("{}", toml::to_string_pretty(&cfg)?);
        std::process::exit(0);
    }
    if cli.plan {
        use scgpt_engine::plan::{count_params, parse_mem, plan_vocab, Plan, PlanInput};
        let gpu_mem = cli.gpu_mem.as_deref().map(parse_mem).transpose()?;
        let (vocab, source) = plan_vocab(&cfg)?;
        println!("vocabulary: {source}");
        let mut input = PlanInput::from_config(&cfg, count_params(&cfg, vocab)?);
        // Sized for a GPU's memory, the plan counts what the GPU backends keep, whatever device
        // the config names.
        input.cpu_kernels &= gpu_mem.is_none();
        let plan = Plan::new(input);
        for line in plan.report(gpu_mem) {
            println!("{line}");
        }
        std::process::exit(0);
    }
    if cfg.run.threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(cfg.run.threads).build_global();
    }
    let info = scgpt_dist::RankInfo::from_env()?;
    // GPU ranks exchange gradients through NCCL unless told otherwise.
    let backend = if cfg.dist.backend == "auto" && cfg.run.device == "cuda" && info.world > 1 { "nccl" } else { cfg.dist.backend.as_str() };
    let comm = scgpt_dist::connect(&info, backend, std::time::Duration::from_secs(cfg.dist.timeout_s))?;
    let quiet = cli.quiet || info.rank != 0;
    // The perturbation task trains its own model (the original's TransformerGenerator).
    if cfg.task.kind == TaskKind::Perturbation {
        let trainer = Trainer::perturbation(cfg, comm)?;
        return if quiet { trainer.quiet() } else { trainer }.run();
    }
    let trainer = Trainer::new(cfg, comm)?;
    if quiet { trainer.quiet() } else { trainer }.run()
}
