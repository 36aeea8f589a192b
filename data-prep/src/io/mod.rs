//! The I/O only scgpt-prep needs, built for reading a corpus at the disk's rate and writing
//! shards without copies (each measured in docs/benchmarks.md): HDF5 datasets read past the
//! library ([`h5_chunks`], [`h5_direct`], [`csr_reader`]), `O_DIRECT` reads and hashed writes
//! ([`direct_io`]), and the shard writer with hand-encoded Parquet list pages
//! ([`shard_writer`], [`list_pages`]). Training and inference read through `scgpt-data` alone.

pub mod csr_reader;
pub mod direct_io;
pub mod h5_chunks;
pub mod h5_direct;
pub mod list_pages;
pub mod shard_writer;
