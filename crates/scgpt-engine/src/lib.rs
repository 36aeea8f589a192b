//! The scGPT training engine: every recipe reuses it.
//!
//! - [`config`]: the `scgpt-train` TOML (run, data, model under args.json names, train, valid,
//!   task, preprocess, dist).
//! - [`collate`]: cells to generative (pcpt/gen), masked-value or fine-tuning minibatches, as
//!   the original.
//! - [`optim`]: PyTorch-exact Adam/AdamW keyed by parameter path, global-norm clipping, warmup + cosine.
//! - [`init`]: fresh models, continual pretraining from original or native checkpoints, vocabulary extension.
//! - [`tasks`]: what a run trains (generative or masked-value pretraining, annotation,
//!   integration, perturbation): collation, loss terms, validation scores.
//! - [`model`]: what the loop needs of the model behind a task ([`EngineModel`]: the
//!   `TransformerModel` or the perturbation `TransformerGenerator`).
//! - [`trainer`]: the loop, written once for every task; [`checkpoint`], [`validation`], [`logging`] its parts.
//! - [`data`]: shard sets, or h5ad inputs prepared into the run directory; [`preprocess`]: the
//!   `[preprocess]` gene selection on them; [`screen`] and [`perturbation_data`]: a
//!   perturbation screen read whole, split by condition and prepared.
//! - [`device`]: the compute devices of the build; [`grad_sync`]: the data-parallel gradient
//!   all-reduce in device-side buckets (in place in GPU memory under NCCL).
//! - [`metrics`]: kNN accuracy and ASW of cell embeddings.
//! - [`tensorboard`]: TensorBoard event files.

pub mod checkpoint;
pub mod collate;
pub mod config;
pub mod data;
pub mod device;
pub mod grad_sync;
pub mod init;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod perturbation_data;
pub mod plan;
pub mod precision;
pub mod preprocess;
pub mod screen;
pub mod tasks;
pub mod tensorboard;
pub mod trainer;
pub mod validation;

pub use config::TrainConfig;
pub use model::EngineModel;
pub use trainer::{latest_checkpoint, RunEnd, TrainState, Trainer};
