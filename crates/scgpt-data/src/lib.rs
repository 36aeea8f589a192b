//! Data formats shared by data-prep, training and inference.
//!
//! - [`vocab`]: the original's `vocab.json` gene vocabulary, Ensembl-to-symbol bridging.
//! - [`binning`]: the original's per-cell quantile binning, with seeded or lowest-bin tie-breaking.
//! - [`h5ad`]: a bounded-memory reader (row blocks) and a writer for AnnData h5ad files.
//! - [`shard`]: the binned Parquet shard schema and its readers.
//! - [`tokenize`]: one cell to model input as the original's `embed_data` (seeded or deterministic).
//! - [`loader`]: shuffled, resumable, prefetching batches over shard sets for training.
//! - [`atomic`]: temp-file-plus-rename writes, so a crash never leaves a half file.
//!
//! The I/O speed-ups only data-prep needs (direct HDF5 reads, `O_DIRECT`, the hand-encoded
//! shard writer) live in scgpt-prep's `io` module.

pub mod alloc;
pub mod atomic;
pub mod binning;
pub mod h5ad;
pub mod loader;
pub mod seed;
pub mod shard;
pub mod simd;
pub mod small_int;
pub mod tokenize;
pub mod vocab;
pub mod words;
