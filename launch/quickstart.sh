#!/usr/bin/env bash
# From a fresh clone: install what is missing, build, and run the main jobs on the bundled real data.
#   1. data-prep: tests/data/wu2020_200.h5ad (200 T cells, raw UMI counts) -> binned Parquet shards
#   2. scgpt-prep inspect on the result
#   3. scgpt-train: the tiny generative pretraining config (configs/pretrain_tiny.toml), a few
#      minutes on 2 cores; rerunning resumes (or finishes at once when it is done)
#   4. scgpt embed with the pretrained model (exported in the original's format) -> obsm["X_scGPT"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
cargo build --release
BIN=${CARGO_TARGET_DIR:-target}/release
$BIN/scgpt-prep --config configs/prep_example.toml
$BIN/scgpt-prep inspect out/prep_example
$BIN/scgpt-train --config configs/pretrain_tiny.toml
$BIN/scgpt embed --model checkpoints/pretrain_tiny/best_model --input tests/data/wu2020_200.h5ad \
  --output out/wu2020_200.embedded.h5ad
echo "quickstart: embeddings in out/wu2020_200.embedded.h5ad (obsm[\"X_scGPT\"]); TensorBoard logs in checkpoints/pretrain_tiny/tensorboard"
