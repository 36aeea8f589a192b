//! scGPT's `TransformerModel` in burn 0.22: configuration from an original `args.json`, the
//! model with PyTorch-compatible parameter names, and loading of the original `best_model.pt`.
//!
//! See `STATUS.md` in this crate for what is implemented and verified against the original.

pub mod config;
pub mod error;
pub mod generative;
pub mod layers;
pub mod load;
pub mod loss;
pub mod model;

pub use burn;
pub use config::{BatchNormStyle, CellEmbStyle, InputEmbStyle, ModelConfig, MvcDecoderStyle};
pub use error::{ModelError, Result};
pub use generative::{GenerativeInput, GenerativeOutput};
pub use load::{load_pretrained, model_param_shapes, normalize_key, LoadReport, SkippedKey};
pub use model::{Embedded, ForwardFlags, ModelInput, ModelOutput, TransformerModel};
