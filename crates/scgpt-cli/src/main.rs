//! `scgpt`: inference commands on original scGPT checkpoints.
//!
//! `scgpt embed`: zero-shot cell embeddings, the original's `scgpt.tasks.embed_data` recipe
//! (see `embed.rs`). `scgpt export` / `scgpt convert`: between the original's checkpoint format
//! and ours (see `export.rs`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod baseline;
mod embed;
mod export;
mod model_dir;
mod sink;
mod source;

#[derive(Debug, Parser)]
#[command(
    name = "scgpt",
    version,
    about = "scGPT in Rust: inference on original checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cell embeddings (the `<cls>` output, L2-normalised) into obsm["X_scGPT"] of a copy of
    /// the input, or into Parquet / .npy.
    Embed(embed::EmbedArgs),
    /// Write a checkpoint (native or original) in the original's format: best_model.pt +
    /// vocab.json + args.json.
    Export(export::ExportArgs),
    /// Convert the original's checkpoint folder into a native checkpoint.
    Convert(export::ConvertArgs),
    /// Baselines to compare models against (`baseline annotation`: PCA + logistic regression).
    Baseline(baseline::BaselineArgs),
}

fn main() -> ExitCode {
    scgpt_data::alloc::tune_for_tensors();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(&args),
        Command::Export(args) => export::export(&args),
        Command::Convert(args) => export::convert(&args),
        Command::Baseline(args) => baseline::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
