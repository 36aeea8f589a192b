use std::process::ExitCode;

use clap::Parser;

use scgpt_prep::cli::{Cli, Command};
use scgpt_prep::{inspect, pipeline, plant_batch, simulate, simulate_perturbation};

fn main() -> ExitCode {
    scgpt_data::alloc::tune_for_tensors();
    // scgpt-prep only reads its inputs and writes new files under temp names, so HDF5's file
    // locks buy nothing here and fail on many cluster filesystems (Lustre, NFS) and on files
    // whose lock another process inherited. The user's explicit setting wins.
    if std::env::var_os("HDF5_USE_FILE_LOCKING").is_none() {
        std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_threads(workers: usize) {
    // Named, so per-thread CPU (top -H, perf) shows which stage bounds a run. Fails only if a
    // pool already exists, which cannot happen this early; 0 threads = one per core.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(workers).thread_name(|i| format!("prep-bin-{i}")).build_global();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Inspect { dir, json }) => {
            let i = inspect::inspect(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                inspect::print(&dir, &i);
            }
            Ok(())
        }
        Some(Command::Simulate(args)) => simulate::run(&args),
        Some(Command::SimulatePerturbation(args)) => simulate_perturbation::run(&args),
        Some(Command::PlantBatch(args)) => plant_batch::run(&args),
        None => {
            let (cfg, _) = cli.run.resolve()?;
            init_threads(cfg.run.workers);
            let prep = pipeline::Prep::new(cfg)?;
            let s = prep.run()?;
            println!(
                "{} cells written from {} input cells in {:.1}s ({:.0} cells/s); {} file(s) processed, {} already done{}",
                s.cells_out,
                s.cells_in,
                s.seconds,
                s.cells_in as f64 / s.seconds.max(1e-9),
                s.files_done,
                s.files_resumed_or_skipped,
                if s.skipped.is_empty() { String::new() } else { format!(", {} skipped as bad", s.skipped.len()) }
            );
            Ok(())
        }
    }
}
