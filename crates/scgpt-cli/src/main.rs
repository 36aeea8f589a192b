//! `scgpt`: inference commands on original scGPT checkpoints.
//!
//! `scgpt embed`: zero-shot cell embeddings, the original's `scgpt.tasks.embed_data` recipe
//! (see `embed.rs`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod embed;
mod model_dir;
mod sink;
mod source;
mod tokenize;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
