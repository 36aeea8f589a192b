#!/usr/bin/env bash
# Annotation fine-tuning (`scgpt-train`, task.kind = "annotation") and classifier inference
# (`scgpt predict`) against the original's fine-tuning step and inference (its TransformerModel
# with the CLS head, PyTorch on the CPU), same architecture, same token shapes, same thread
# count, in one run; prints s/step, cells/s, peak RSS and the ratios.
#
#   bash benches/annotate_bench.sh [WORKDIR] [STEPS]
#
# Mid-sized model (the tutorial's whole-human d 512 / 12 layers / 3001 tokens is far too slow on
# 2 cores): vocabulary 60,697 (whole-human), d 256, 4 layers, 8 heads, d_hid 256, 512 tokens per
# cell (<cls> + 511 genes; every simulated cell has ~1,500 expressed genes, so every batch is
# full), CLS head of 3 layers over the simulated cell types, dropout 0.2, batch 32, Adam lr 1e-4
# eps 1e-4, clip 1.0, cross entropy only, from scratch. Predict: batch 64 (both sides).
#
# WORKDIR  default /tmp/scgpt-annotate-bench
# STEPS    default 8 optimizer steps per side; s/step is the median over steps 2..STEPS
# THREADS  environment, default 2 (rayon for ours, torch.set_num_threads for the reference)
# CELLS    environment, default 2000: cells simulated; training reads them (10% held out for
#          validation, as the tutorial), predict runs over all of them
# TORCH_PY environment, default /work/venv-torch/bin/python: torch, numpy and
#          `pip install --no-deps scgpt==0.2.4`
# ATTENTION environment, default blockwise (the recipe's): our run.attention during fine-tuning
set -euo pipefail
export ATTENTION=${ATTENTION:-blockwise}
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-annotate-bench}
STEPS=${2:-8}
THREADS=${THREADS:-2}
CELLS=${CELLS:-2000}
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release
BATCH=32
PRED_BATCH=64
TYPES=8
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep
SIM=$WORK/sim_$CELLS.h5ad
# obs["cell_type"] = the planted types (type_00..type_07): the label column.
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate --cells "$CELLS" --genes 20000 --genes-per-cell 1500 \
  --cell-types $TYPES --seed 3 --out "$SIM" --quiet
# Shards with the shipped whole-human vocabulary (60,697 tokens) and the label column; no gene
# filter, as the recipe's own preparation of `data.input` (which would build a vocabulary of the
# file's 20,000 genes instead of the whole-human one).
[ -f "$WORK/shards/manifest.json" ] || "$BIN/scgpt-prep" --input "$SIM" --gene-col feature_name \
  --obs-cols cell_type --set filter.gene_min_counts_per_10k_cells=0.0 --out "$WORK/shards" --quiet
rm -rf "$WORK/run" "$WORK/pred.h5ad"

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}

# Ours: the annotation recipe, shrunk to the bench's model, from scratch. Validation runs at the
# last step (eval_each_epoch: the last step is the epoch's end), which writes best_model/.
OURS_TRAIN=$(measure ours_train env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt-train" --quiet \
  --config configs/finetune_annotation.toml \
  --set run.dir="$WORK/run" --set 'data.input=[]' --set "data.shards=[\"$WORK/shards\"]" \
  --set task.label_col=cell_type --set model.init_from='""' --set run.threads="$THREADS" \
  --set model.embsize=256 --set model.nheads=8 --set model.d_hid=256 --set model.nlayers=4 \
  --set model.n_layers_cls=3 --set model.max_seq_len=512 --set model.dropout=0.2 --set run.attention="\"$ATTENTION\"" \
  --set train.batch_size=$BATCH --set train.lr=1e-4 --set train.eps=1e-4 --set train.clip_norm=1.0 \
  --set train.max_steps="$STEPS" --set train.log_every=1 --set train.save_every=100000)
[ -f "$WORK/run/best_model/best_model.pt" ] || { echo "no best_model/ written" >&2; cat "$WORK/ours_train.out" >&2; exit 1; }
REF_TRAIN=$(measure ref_train env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" \
  benches/annotate_reference.py train --d 256 --layers 4 --heads 8 --d-hid 256 --layers-cls 3 \
  --n-cls $TYPES --len 512 --batch $BATCH --steps "$STEPS" --threads "$THREADS")
OURS_PRED=$(measure ours_predict env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt" predict --quiet \
  --model "$WORK/run/best_model" --input "$SIM" --output "$WORK/pred.h5ad" --batch-size $PRED_BATCH)
REF_PRED=$(measure ref_predict env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" \
  benches/annotate_reference.py predict --d 256 --layers 4 --heads 8 --d-hid 256 --layers-cls 3 \
  --n-cls $TYPES --len 512 --batch $PRED_BATCH --cells "$CELLS" --threads "$THREADS")

python3 - "$OURS_TRAIN" "$REF_TRAIN" "$OURS_PRED" "$REF_PRED" "$WORK" "$THREADS" "$BATCH" "$CELLS" <<'PYEOF'
import json, statistics, sys
ot, rt, op, rp, work = sys.argv[1:6]
threads, batch, cells = map(int, sys.argv[6:9])
def parse(s):
    _, wall, kb, user, sys_ = s.split()
    return float(wall), int(kb) / 1024, float(user) + float(sys_)
def last_json(label):
    return json.loads([l for l in open(f"{work}/{label}.out") if l.startswith("{")][-1])
ot_wall, ot_mb, _ = parse(ot)
rt_wall, rt_mb, _ = parse(rt)
op_wall, op_mb, op_cpu = parse(op)
rp_wall, rp_mb, rp_cpu = parse(rp)
lines = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl")]
train = [l for l in lines if "train/cells_per_s" in l]
cps = [l["train/cells_per_s"] for l in train][1:]  # step 1 warms up
tok = train[-1]["train/tokens_per_s"] / train[-1]["train/cells_per_s"]
o_cps = statistics.median(cps)
r = last_json("ref_train")
p = last_json("ref_predict")
print(f"\nannotation fine-tuning step, vocab 60697, d 256, 4 layers, 8 heads, d_hid 256, CLS head 3 "
      f"layers, {tok:.0f} tokens/cell (ref {r['len']}), batch {batch}, {threads} threads, CPU")
print(f"{'':<34}{'s/step':>9}{'cells/s':>9}{'peak RSS':>10}{'process':>10}")
print(f"{'scgpt-train (burn flex)':<34}{batch / o_cps:>9.2f}{o_cps:>9.2f}{ot_mb:>8.0f}MB{ot_wall:>9.1f}s")
print(f"{'reference (PyTorch ' + r['torch'] + ')':<34}{r['seconds_per_step']:>9.2f}{r['cells_per_s']:>9.2f}{rt_mb:>8.0f}MB{rt_wall:>9.1f}s")
print(f"ratio ours/reference: throughput {o_cps / r['cells_per_s']:.2f}x (>1 = ours faster), peak RSS {ot_mb / rt_mb:.2f}x")
print(f"  ours per step (s): {' '.join(f'{batch / c:.2f}' for c in [l['train/cells_per_s'] for l in train])}")
print(f"  ref  per step (s): {' '.join(f'{t:.2f}' for t in r['step_times'])}")
o_pcps = cells / op_wall
print(f"\npredict, {cells} cells, batch {p['batch']}, {p['len']} tokens/cell, {threads} threads, CPU")
print(f"{'':<34}{'wall':>9}{'cells/s':>9}{'peak RSS':>10}{'CPU s':>8}")
print(f"{'scgpt predict (end to end)':<34}{op_wall:>8.1f}s{o_pcps:>9.2f}{op_mb:>8.0f}MB{op_cpu:>8.1f}")
print(f"{'reference (model loop only)':<34}{p['seconds']:>8.1f}s{p['cells_per_s']:>9.2f}{rp_mb:>8.0f}MB{rp_cpu:>8.1f}")
print(f"{'reference (whole process)':<34}{rp_wall:>8.1f}s{cells / rp_wall:>9.2f}")
print(f"ratio ours/reference: throughput {o_pcps / p['cells_per_s']:.2f}x against its model loop "
      f"({o_pcps / (cells / rp_wall):.2f}x process to process), peak RSS {op_mb / rp_mb:.2f}x")
PYEOF
