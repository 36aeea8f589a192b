//! The scGPT training engine: every recipe reuses it.
//!
//! - [`config`]: the `scgpt-train` TOML (run, data, model under args.json names, train, valid, task).
//! - [`collate`]: cells to generative (pcpt/gen) or masked-value minibatches, as the original.
//! - [`optim`]: PyTorch-exact Adam/AdamW keyed by parameter path, global-norm clipping, warmup + cosine.
//! - [`init`]: fresh models, continual pretraining from original or native checkpoints, vocabulary extension.
//! - [`trainer`]: the loop, checkpoints and resume, validation, logging.
//! - [`metrics`]: kNN accuracy and ASW of cell embeddings.
//! - [`tensorboard`]: TensorBoard event files.

pub mod collate;
pub mod config;
pub mod device;
pub mod init;
pub mod metrics;
pub mod optim;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{latest_checkpoint, RunEnd, TrainState, Trainer};
