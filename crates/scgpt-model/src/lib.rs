//! scGPT's `TransformerModel` in burn 0.22: configuration from an original `args.json`, the
//! model with PyTorch-compatible parameter names, and loading of the original `best_model.pt`.
//!
//! See `STATUS.md` in this crate for what is implemented and verified against the original.

pub mod attention_grn;
pub mod block_attention;
pub mod block_attention_cpu;
pub mod cast;
pub mod config;
mod cpu_attention;
pub mod error;
pub mod generative;
pub mod io;
pub mod layers;
pub mod loss;
pub mod model;
pub mod perturbation;

pub use burn;
pub use config::{BatchNormStyle, CellEmbStyle, InputEmbStyle, ModelConfig, MvcDecoderStyle};
pub use error::{ModelError, Result};
pub use generative::{GenerativeInput, GenerativeOutput};
pub use io::checkpoint::{export_original, load_native, save_native, ExportReport, NativeCheckpoint};
pub use io::load::{load_pretrained, load_pretrained_prefixes, model_param_shapes, normalize_key, original_key, LoadReport, SkippedKey};
pub use model::{Embedded, ForwardFlags, ModelInput, ModelOutput, TransformerModel};
pub use perturbation::{
    DecoderActivation, IncludeZeroGene, PerturbationConfig, PerturbationInput, PerturbationOutput, TransformerGenerator,
    TUTORIAL_LOAD_PREFIXES,
};
