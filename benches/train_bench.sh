#!/usr/bin/env bash
# scgpt-train against the original's generative pretraining step in PyTorch (CPU), same
# architecture, same token shapes, same thread count, in one run; prints cells/s, peak RSS and
# the ratio. Mid-sized model of the issue: vocabulary 60,697 (whole-human), d 256, 4 layers,
# 8 heads, d_hid 256, 512 tokens per cell (gen ratio 0.5: 257 pcpt + 255 gen), dropout 0.2,
# batch 16, Adam + global clip, both passes.
#
#   bash benches/train_bench.sh [WORKDIR] [STEPS]
#
# THREADS  environment, default 2 (rayon for ours, torch.set_num_threads for the reference)
# TORCH_PY environment, default /work/venv-torch/bin/python: torch, numpy, tqdm and
#          `pip install --no-deps scgpt==0.2.4`
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-train-bench}
STEPS=${2:-8}
THREADS=${THREADS:-2}
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release
BATCH=16
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep
SIM=$WORK/sim.h5ad
# Every cell has far more than 511 expressed genes, so every batch is full (no padding).
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate --cells 400 --genes 20000 --genes-per-cell 1500 --seed 3 --out "$SIM" --quiet
[ -f "$WORK/shards/manifest.json" ] || "$BIN/scgpt-prep" --input "$SIM" --gene-col feature_name --out "$WORK/shards" --quiet
rm -rf "$WORK/run"

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb"
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}
OURS=$(measure ours "$BIN/scgpt-train" --quiet \
  --set run.dir="$WORK/run" --set "data.shards=[\"$WORK/shards\"]" --set valid.label_set='""' \
  --set data.valid_fraction=0.0 --set run.threads="$THREADS" \
  --set model.embsize=256 --set model.nheads=8 --set model.d_hid=256 --set model.nlayers=4 \
  --set model.max_seq_len=512 --set model.dropout=0.2 --set 'train.gen_ratios=[0.5]' \
  --set train.batch_size=$BATCH --set train.lr=1e-4 --set train.warmup_steps=0 \
  --set train.max_steps="$STEPS" --set train.log_every=1 --set train.eval_every=100000 --set train.save_every=100000)
REF=$(measure original env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" benches/train_reference.py \
  --d 256 --layers 4 --heads 8 --d-hid 256 --len 512 --ratio 0.5 --batch $BATCH --steps "$STEPS" --threads "$THREADS")

python3 - "$OURS" "$REF" "$WORK" "$THREADS" <<'PYEOF'
import json, statistics, sys
ours, ref, work, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
o_mb = int(ours.split()[2]) / 1024
r_mb = int(ref.split()[2]) / 1024
lines = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl")]
cps = [l["train/cells_per_s"] for l in lines if "train/cells_per_s" in l][1:]  # step 1 warms up
o_cps = statistics.median(cps)
r = json.loads([l for l in open(f"{work}/original.out") if l.startswith("{")][-1])
print(f"generative step, vocab 60697, d 256, 4 layers, 8 heads, d_hid 256, {r['P']}+{r['G']} tokens, "
      f"batch 16, {threads} threads, CPU")
print(f"{'':<34}{'s/step':>9}{'cells/s':>9}{'peak RSS':>10}")
print(f"{'scgpt-train (burn flex)':<34}{16 / o_cps:>9.2f}{o_cps:>9.2f}{o_mb:>8.0f}MB")
print(f"{'reference (PyTorch ' + r['torch'] + ')':<34}{r['seconds_per_step']:>9.2f}{r['cells_per_s']:>9.2f}{r_mb:>8.0f}MB")
print(f"ratio ours/reference: throughput {o_cps / r['cells_per_s']:.2f}x (>1 = ours faster), peak RSS {o_mb / r_mb:.2f}x")
PYEOF
