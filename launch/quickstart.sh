#!/usr/bin/env bash
# From a fresh clone: install what is missing, build, and run the main job on the bundled real data.
#   1. data-prep: tests/data/wu2020_200.h5ad (200 T cells, raw UMI counts) -> binned Parquet shards
#   2. scgpt-prep inspect on the result
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
cargo build --release
PREP=target/release/scgpt-prep
$PREP --config configs/prep_example.toml
$PREP inspect out/prep_example
