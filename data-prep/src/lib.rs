//! scgpt-prep: CELLxGENE-style h5ad corpora to binned Parquet shards (see the README).

pub mod cli;
pub mod config;
pub mod inspect;
pub mod io;
pub mod obs_filter;
pub mod pipeline;
pub mod plant_batch;
pub mod simulate;
pub mod simulate_perturbation;
