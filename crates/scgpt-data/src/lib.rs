//! Data formats shared by data-prep, training and inference.
//!
//! - [`vocab`]: the original's `vocab.json` gene vocabulary, Ensembl-to-symbol bridging.
//! - [`binning`]: the original's per-cell quantile binning, with seeded or lowest-bin tie-breaking.
//! - [`h5ad`]: a bounded-memory reader (row blocks) and a writer for AnnData h5ad files.
//! - [`shard`]: the binned Parquet shard schema, writer and reader.
//! - [`tokenize`]: one cell to model input as the original's `embed_data` (seeded or deterministic).
//! - [`loader`]: shuffled, resumable, prefetching batches over shard sets for training.
//! - [`atomic`]: temp-file-plus-rename writes, so a crash never leaves a half file.
//! - [`direct_io`], [`h5_direct`]: reads and writes past the page cache and HDF5's lock.

pub mod alloc;
pub mod atomic;
pub mod binning;
pub mod direct_io;
pub mod h5_chunks;
pub mod h5_direct;
pub mod h5ad;
pub mod list_pages;
pub mod loader;
pub mod seed;
pub mod shard;
pub mod small_int;
pub mod tokenize;
pub mod vocab;
pub mod words;
