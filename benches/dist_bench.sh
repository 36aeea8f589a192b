#!/usr/bin/env bash
# Data-parallel step time on CPU: the same global batch (16 cells) on 1 rank with 2 threads and
# on 2 TCP ranks with 1 thread each (launch/local.sh), plus the share of step time spent in
# communication (gradient all-reduce + metric sums), read from metrics.jsonl.
# Model: whole-human vocabulary (60,697), d 128, 2 layers, 4 heads, d_hid 128, 256 tokens.
#   bash benches/dist_bench.sh [WORKDIR] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-dist-bench}
STEPS=${2:-8}
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep
SIM=$WORK/sim.h5ad
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate --cells 400 --genes 20000 --genes-per-cell 1500 --seed 3 --out "$SIM" --quiet
[ -f "$WORK/shards/manifest.json" ] || "$BIN/scgpt-prep" --input "$SIM" --gene-col feature_name --out "$WORK/shards" --quiet
common=(--quiet --set "data.shards=[\"$WORK/shards\"]" --set valid.label_set='""' --set data.valid_fraction=0.0
  --set model.embsize=128 --set model.nheads=4 --set model.d_hid=128 --set model.nlayers=2
  --set model.max_seq_len=256 --set 'train.gen_ratios=[0.5]' --set train.warmup_steps=0
  --set train.max_steps="$STEPS" --set train.log_every=1 --set train.eval_every=100000 --set train.save_every=100000)
rm -rf "$WORK/r1" "$WORK/r2"
RAYON_NUM_THREADS=2 "$BIN/scgpt-train" "${common[@]}" --set run.dir="$WORK/r1" --set train.batch_size=16 2> "$WORK/r1.log"
RAYON_NUM_THREADS=1 SCGPT_TRAIN="$BIN/scgpt-train" launch/local.sh 2 "${common[@]}" --set run.dir="$WORK/r2" --set train.batch_size=8 2> "$WORK/r2.log"
python3 - "$WORK" <<'PYEOF'
import json, statistics, sys
work = sys.argv[1]
def stats(run):
    lines = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl") if '"train/cells_per_s"' in l][1:]
    cps = statistics.median(l["train/cells_per_s"] for l in lines)
    comm = statistics.median(l["train/comm_share"] for l in lines)
    return 16 / cps, comm
s1, c1 = stats("r1")
s2, c2 = stats("r2")
print("global batch 16, vocab 60697, d 128, 2 layers, 129+127 tokens; gradient 8.4M floats (34 MB)")
print(f"1 rank x 2 threads: {s1:.2f} s/step, communication {100*c1:.1f}%")
print(f"2 ranks x 1 thread (TCP loopback): {s2:.2f} s/step, communication {100*c2:.1f}% of rank 0's step")
print(f"speed-up 2 ranks vs 1: {s1/s2:.2f}x")
PYEOF
