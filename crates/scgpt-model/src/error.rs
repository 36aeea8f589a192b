//! Errors of the model crate. Every variant names the file (or the input) and the field or key
//! at fault, so a bad args.json or checkpoint can be fixed without reading the source.

use std::path::PathBuf;

/// Anything that can go wrong while building, loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read at all.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// args.json is not valid JSON, or a field has the wrong JSON type.
    #[error("{path}: field `{field}`: {message}")]
    Json { path: PathBuf, field: String, message: String },

    /// A configuration value is missing or outside what the model supports. `origin` is the
    /// file it came from, or `<code>` for a config built in Rust.
    #[error("{origin}: field `{field}`: {message}")]
    Config { origin: String, field: String, message: String },

    /// The checkpoint is not a readable PyTorch file (truncated, not a zip/pickle, no tensors).
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// A checkpoint or one of its side files could not be written.
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },

    /// The checkpoint was read, but tensors the model cannot work without were absent or had
    /// the wrong shape.
    #[error(
        "checkpoint {path}: {} required tensor(s) missing or mismatched: {}",
        keys.len(),
        keys.join(", ")
    )]
    RequiredKeys { path: PathBuf, keys: Vec<String> },

    /// A forward-pass input is inconsistent with the model or with itself.
    #[error("input `{field}`: {message}")]
    Input { field: String, message: String },
}

impl ModelError {
    pub(crate) fn config(origin: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config { origin: origin.into(), field: field.into(), message: message.into() }
    }

    pub(crate) fn input(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Input { field: field.into(), message: message.into() }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
