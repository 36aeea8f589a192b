# Sourced by the training-memory benches: builds the release binaries and simulated shards whose
# cells all have 3,000 expressed genes (full batches up to 2,400 tokens) over the whole-human
# gene set, in $WORK (set by the caller). Sets BIN.
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep || exit 1
SIM=$WORK/sim.h5ad
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate --cells 96 --genes 20000 --genes-per-cell 3000 --seed 5 --out "$SIM" --quiet || exit 1
[ -f "$WORK/shards/manifest.json" ] || "$BIN/scgpt-prep" --input "$SIM" --gene-col feature_name --out "$WORK/shards" --quiet || exit 1
