#!/usr/bin/env bash
# Integration fine-tuning (`scgpt-train --config configs/finetune_integration.toml`,
# task.kind = "integration") against the original's fine-tuning step with the same flags (its
# TransformerModel as Tutorial_Integration builds and trains it, PyTorch on the CPU), same
# architecture, same token shapes, same thread count, in one run; prints s/step, cells/s, peak
# RSS and the ratio.
#
#   bash benches/integrate_bench.sh [WORKDIR] [STEPS]
#
# Objective (both sides, the tutorial's): masked-value GEP MSE + its zero-probability NLL, GEPC
# (MVC) MSE + its zero-probability NLL, 10 x ECS (threshold 0.8), 1.0 x DAR cross entropy over
# the batch labels, DSBN and batch embeddings (use_batch_labels), mask ratio 0.4 (exactly
# int(0.4 n) positions per cell, <cls> included), <cls> value 0, single-batch minibatches,
# Adam lr 1e-4 eps 1e-4, clip 1.0, dropout 0.2, batch 64, from scratch.
#
# Mid-sized model (the tutorial's whole-human d 512 / 12 layers is far too slow on 2 cores):
# vocabulary 60,697 (whole-human), d 256, 4 layers, 8 heads, d_hid 256, max_seq_len 513.
#
# Token shapes: with include_zero_gene every cell is `<cls>` + every gene of the data (zeros
# included), so the data must have 512 genes. `preprocess.hvg=512` would do that only through
# `data.input`, whose preparation builds a vocabulary of the file's genes (a ~500-row embedding
# table instead of the whole-human 60,697 rows, which changes the optimizer's cost). So the
# simulated h5ad itself has exactly 512 genes (real symbols of the shipped vocabulary), every
# one expressed in some cell, and is sharded with the shipped vocabulary and no gene filter:
# every row is then <cls> + the same 512 genes = 513 tokens, no padding, as the reference's
# rows (the tutorial's HVG matrix); the script checks the 513 from our metrics.
# Batch labels: the simulation's obs["batch"] (BATCHES planted batches with per-gene batch
# effects; default 2, as the tutorial's PBMC 10k), read through data.batch_col=batch; the
# reference has num_batch_labels=BATCHES and one label per minibatch.
#
# WORKDIR  default /tmp/scgpt-integrate-bench
# STEPS    default 6 optimizer steps per side; s/step is the median over steps 2..STEPS
# THREADS  environment, default 2 (rayon for ours, torch.set_num_threads for the reference)
# CELLS    environment, default 2000 cells simulated (10% held out for validation, as the
#          tutorial; validation runs once, after the last step, outside the step timing)
# BATCHES  environment, default 2 batch labels
# TORCH_PY environment, default /work/venv-torch/bin/python: torch, numpy and
#          `pip install --no-deps scgpt==0.2.4`
# ATTENTION environment, default blockwise (the recipe's): our run.attention
set -euo pipefail
export ATTENTION=${ATTENTION:-blockwise}
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-integrate-bench}
STEPS=${2:-6}
THREADS=${THREADS:-2}
CELLS=${CELLS:-2000}
BATCHES=${BATCHES:-2}
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release
BATCH=64
GENES=512
LEN=$((GENES + 1))
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep
SIM=$WORK/sim_${CELLS}_${GENES}_${BATCHES}.h5ad
SHARDS=$WORK/shards_${CELLS}_${GENES}_${BATCHES}
# ~300 of the 512 genes expressed per cell (all 512 somewhere in 2,000 cells); 8 types x 25
# markers + 5 programs x 30 genes fit in 512 genes (the defaults, 8 x 50 + 10 x 30, do not).
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate --cells "$CELLS" --genes $GENES --genes-per-cell 300 \
  --cell-types 8 --markers 25 --programs 5 --batches "$BATCHES" --seed 3 --out "$SIM" --quiet
[ -f "$SHARDS/manifest.json" ] || "$BIN/scgpt-prep" --input "$SIM" --gene-col feature_name \
  --obs-cols batch,cell_type --set filter.gene_min_counts_per_10k_cells=0.0 --out "$SHARDS" --quiet
rm -rf "$WORK/run"

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}

# Ours: the integration recipe, shrunk to the bench's model, from scratch, on the shards (its
# [preprocess] gene selection applies to data.input only: off, the shards hold the 512 genes).
OURS=$(measure ours_train env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt-train" --quiet \
  --config configs/finetune_integration.toml \
  --set run.dir="$WORK/run" --set 'data.input=[]' --set "data.shards=[\"$SHARDS\"]" \
  --set data.batch_col=batch --set preprocess.hvg=0 --set preprocess.filter_gene_by_counts=0 \
  --set model.init_from='""' --set run.threads="$THREADS" \
  --set model.embsize=256 --set model.nheads=8 --set model.d_hid=256 --set model.nlayers=4 \
  --set model.max_seq_len=$LEN --set model.dropout=0.2 --set run.attention="\"$ATTENTION\"" \
  --set train.batch_size=$BATCH --set train.lr=1e-4 --set train.eps=1e-4 --set train.clip_norm=1.0 \
  --set train.max_steps="$STEPS" --set train.log_every=1 --set train.save_every=100000)
REF=$(measure ref_train env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" \
  benches/integrate_reference.py --d 256 --layers 4 --heads 8 --d-hid 256 --len $LEN \
  --batches "$BATCHES" --batch $BATCH --steps "$STEPS" --threads "$THREADS")

python3 - "$OURS" "$REF" "$WORK" "$THREADS" "$BATCH" "$LEN" "$BATCHES" <<'PYEOF'
import json, statistics, sys
ot, rt, work = sys.argv[1:4]
threads, batch, length, batches = map(int, sys.argv[4:8])
def parse(s):
    _, wall, kb, user, sys_ = s.split()
    return float(wall), int(kb) / 1024, float(user) + float(sys_)
ot_wall, ot_mb, ot_cpu = parse(ot)
rt_wall, rt_mb, rt_cpu = parse(rt)
lines = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl")]
train = [l for l in lines if "train/cells_per_s" in l]
cps = [l["train/cells_per_s"] for l in train][1:]  # step 1 warms up
tok = train[-1]["train/tokens_per_s"] / train[-1]["train/cells_per_s"]
if round(tok) != length:
    sys.exit(f"ours fed {tok:.1f} tokens per cell, the reference {length}: shapes differ")
o_cps = statistics.median(cps)
r = json.loads([l for l in open(f"{work}/ref_train.out") if l.startswith("{")][-1])
print(f"\nintegration fine-tuning step (GEP + GEPC + zero-prob + 10 ECS + DAR, DSBN, batch "
      f"embeddings, {batches} batches), vocab 60697, d 256, 4 layers, 8 heads, d_hid 256, "
      f"{tok:.0f} tokens/cell (ref {r['len']}), batch {batch}, {threads} threads, CPU")
print(f"{'':<34}{'s/step':>9}{'cells/s':>9}{'peak RSS':>10}{'process':>10}{'CPU s':>8}")
print(f"{'scgpt-train (burn flex)':<34}{batch / o_cps:>9.2f}{o_cps:>9.2f}{ot_mb:>8.0f}MB{ot_wall:>9.1f}s{ot_cpu:>8.1f}")
print(f"{'reference (PyTorch ' + r['torch'] + ')':<34}{r['seconds_per_step']:>9.2f}{r['cells_per_s']:>9.2f}{rt_mb:>8.0f}MB{rt_wall:>9.1f}s{rt_cpu:>8.1f}")
print(f"ratio ours/reference: throughput {o_cps / r['cells_per_s']:.2f}x (>1 = ours faster), peak RSS {ot_mb / rt_mb:.2f}x")
print(f"  ours per step (s): {' '.join(f'{batch / c:.2f}' for c in [l['train/cells_per_s'] for l in train])}")
print(f"  ref  per step (s): {' '.join(f'{t:.2f}' for t in r['step_times'])}")
loss_key = next((k for k in ("train/loss",) if k in train[0]), None)
if loss_key:
    print(f"  first-step loss: ours {train[0][loss_key]:.1f}, ref {r['losses'][0]:.1f} (random init, random data)")
PYEOF
