//! `scgpt`: everything but training (`scgpt-train`).
//!
//! `embed` (zero-shot or fine-tuned cell embeddings, `embed.rs`; fine-tuned models through
//! `inference.rs`), `predict` (cell types), `predict-perturbation` (`perturbation.rs`),
//! `eval integration` (scIB metrics), `eval perturbation` (`eval_perturbation.rs`), `baseline
//! annotation|integration`, `experiment run` (paper-style experiments from a TOML), and
//! `export` / `convert` between the original's checkpoint format and ours (`export.rs`), and
//! `grn embedding` / `grn attention` (`grn.rs`, `grn_embedding.rs`, `grn_attention.rs`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod baseline;
mod baseline_integration;
mod embed;
mod eval_integration;
mod eval_perturbation;
mod experiment;
mod experiment_integration;
mod experiment_perturbation;
mod export;
mod grn;
mod grn_attention;
mod grn_embedding;
mod inference;
mod labelled_h5ad;
mod model_dir;
mod perturbation;
mod predict;
mod sink;
mod source;
mod split_h5ad;

#[derive(Debug, Parser)]
#[command(
    name = "scgpt",
    version,
    about = "scGPT in Rust: embeddings, predictions, evaluation, baselines, experiments, checkpoint conversion"
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
    /// Baselines to compare models against (`baseline annotation`: PCA + logistic regression;
    /// `baseline integration`: HVG + PCA and Harmony, scored with the scIB metrics).
    Baseline(baseline::BaselineArgs),
    /// Cell-type labels for a query h5ad: a fine-tuned annotation model's CLS head, or a
    /// k-nearest-neighbour vote on zero-shot embeddings of a labelled reference (--mode knn).
    Predict(predict::PredictArgs),
    /// Expression after a perturbation: a fine-tuned perturbation model's mean prediction over
    /// a pool of control cells for each condition ("FOSB+ctrl", "KLF1+SET"), into an h5ad with
    /// one row per condition.
    PredictPerturbation(perturbation::PredictPerturbationArgs),
    /// Evaluation of embeddings (`eval integration`: scIB batch-integration metrics into
    /// metrics.json).
    Eval(eval_integration::EvalArgs),
    /// Gene regulatory networks from a model (`grn embedding`: gene programs from the gene
    /// embeddings, as Tutorial_GRN; `grn attention`: a perturbed gene's targets from the
    /// attention of a model fine-tuned on the screen, as Tutorial_Attention_GRN).
    #[command(subcommand)]
    Grn(grn::Grn),
    /// Paper-style experiments from a TOML: data (download + checksum, or bundled), a
    /// reference/query split, fine-tuning, kNN mapping and the baseline, and report.md.
    Experiment(experiment::ExperimentArgs),
}

fn main() -> ExitCode {
    scgpt_data::alloc::tune_for_tensors();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(&args),
        Command::Export(args) => export::export(&args),
        Command::Convert(args) => export::convert(&args),
        Command::Baseline(args) => baseline::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::PredictPerturbation(args) => perturbation::predict_run(&args),
        Command::Experiment(args) => experiment::run(&args),
        Command::Eval(args) => eval_integration::run(&args),
        Command::Grn(command) => grn::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
