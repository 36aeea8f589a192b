#!/usr/bin/env bash
# Perturbation fine-tuning (`scgpt-train --config configs/finetune_perturbation.toml`,
# task.kind = "perturbation", the TransformerGenerator) against the original's fine-tuning step
# (scgpt 0.2.4's TransformerGenerator as Tutorial_Perturbation builds and trains it, PyTorch on
# the CPU), same architecture, same token shapes, same thread count, in one run; prints s/step,
# cells/s, peak RSS and the ratio.
#
#   bash benches/perturb_bench.sh [WORKDIR] [STEPS]
#
# Objective (both sides, the tutorial's): a control cell's values in, the perturbation flag on
# the perturbed genes, MSE of the predicted expression against the perturbed cell over every
# token (masked_mse_loss with all positions), dropout 0, Adam lr 1e-4 eps 1e-8, clip 1.0,
# batch 64 cells per optimizer step, from scratch (no pretrained load).
#
# Mid-sized model (the tutorial's whole-human d 512 / 12 layers is far too slow on 2 cores), as
# the integration bench: d 256, 4 layers, 8 heads, d_hid 256. Vocabulary: the screen's genes
# (a fresh model's vocabulary is `<pad>`, `<cls>`, `<eoc>` + the screen's 2,000 genes = 2,003
# tokens; the reference gets the same count from our run's vocab.json). There is no
# whole-human checkpoint in this tree to take a 60,697-token vocabulary from.
#
# Token shapes: the simulated screen has GENES (2,000) genes; each batch takes
# model.max_seq_len = 1,536 of them (the tutorial's max_seq_len), always keeping the batch's
# perturbed genes, so every row is 1,536 tokens, no padding, on both sides; the script checks
# the 1,536 from our metrics.
#
# Memory: our autodiff attention keeps [cells, 8, 1536, 1536] fp32 score tensors per layer
# (75 MB per cell and head-layer), so 64 cells in one pass need far more than this box's
# 24 GiB; MICRO (default 8) cells per micro-batch with 64/MICRO accumulated micro-batches per
# optimizer step (train.grad_accum) give the same 64-cell step. The reference runs the 64 cells
# in one pass, as the tutorial (PyTorch's scaled_dot_product_attention needs no L x L buffers).
#
# WORKDIR  default /tmp/scgpt-perturb-bench
# STEPS    default 4 optimizer steps per side; s/step is the median over steps 2..STEPS
# THREADS  environment, default 2 (rayon for ours, torch.set_num_threads for the reference)
# MICRO    environment, default 8 cells per micro-batch on our side (64 = one pass)
# ATTENTION environment, default blockwise (the recipe's; fits 64 cells in one pass with MICRO=64)
# GENES    environment, default 2000 genes in the simulated screen (> 1,536)
# TORCH_PY environment, default /work/venv-torch/bin/python: torch, numpy and
#          `pip install --no-deps scgpt==0.2.4`
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-perturb-bench}
STEPS=${2:-4}
THREADS=${THREADS:-2}
MICRO=${MICRO:-8}
GENES=${GENES:-2000}
export ATTENTION=${ATTENTION:-blockwise}
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release
BATCH=64
LEN=1536
[ $((BATCH % MICRO)) -eq 0 ] || { echo "MICRO must divide $BATCH" >&2; exit 1; }
[ "$GENES" -gt $LEN ] || { echo "GENES must exceed $LEN" >&2; exit 1; }
ACCUM=$((BATCH / MICRO))
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep
# 24 perturbed genes, 10 doubles, 20 cells each, 400 controls: ~1,080 cells, of which the
# control and train conditions' (~900) feed training; the few val conditions' cells are
# validated once, after the last step, outside the step timing.
SIM=$WORK/screen_${GENES}.h5ad
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate-perturbation --out "$SIM" --genes "$GENES" \
  --perturbed-genes 24 --doubles 10 --cells-per-condition 20 --control-cells 400 --seed 7 --quiet
rm -rf "$WORK/run"

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}

# Ours: the perturbation recipe, shrunk to the bench's model, from scratch.
OURS=$(measure ours_train env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt-train" --quiet \
  --config configs/finetune_perturbation.toml \
  --set run.dir="\"$WORK/run\"" --set data.input="\"$SIM\"" \
  --set model.init_from='""' --set 'model.init_prefixes=[]' --set run.threads="$THREADS" \
  --set model.embsize=256 --set model.nheads=8 --set model.d_hid=256 --set model.nlayers=4 \
  --set model.max_seq_len=$LEN --set model.dropout=0.0 --set run.attention="\"$ATTENTION\"" \
  --set train.batch_size="$MICRO" --set train.grad_accum=$ACCUM \
  --set train.lr=1e-4 --set train.eps=1e-8 --set train.clip_norm=1.0 \
  --set train.max_steps="$STEPS" --set train.log_every=1 --set train.save_every=100000)
NTOKEN=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$WORK/run/data/train/vocab.json")
REF=$(measure ref_train env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" \
  benches/perturb_reference.py --ntoken "$NTOKEN" --genes "$GENES" --d 256 --layers 4 --heads 8 \
  --d-hid 256 --len $LEN --batch $BATCH --steps "$STEPS" --threads "$THREADS")

python3 - "$OURS" "$REF" "$WORK" "$THREADS" "$BATCH" "$LEN" "$NTOKEN" "$MICRO" <<'PYEOF'
import json, statistics, sys
ot, rt, work = sys.argv[1:4]
threads, batch, length, ntoken, micro = map(int, sys.argv[4:9])
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
print(f"\nperturbation fine-tuning step (TransformerGenerator, MSE over all tokens), vocab {ntoken} "
      f"(the screen's genes), d 256, 4 layers, 8 heads, d_hid 256, {tok:.0f} tokens/cell "
      f"(ref {r['len']}), batch {batch} (ours {batch // micro} x {micro} accumulated), "
      f"dropout 0, {threads} threads, CPU, our attention {__import__('os').environ.get('ATTENTION', 'blockwise')}")
print(f"{'':<34}{'s/step':>9}{'cells/s':>9}{'peak RSS':>10}{'process':>10}{'CPU s':>8}")
print(f"{'scgpt-train (burn flex)':<34}{batch / o_cps:>9.2f}{o_cps:>9.2f}{ot_mb:>8.0f}MB{ot_wall:>9.1f}s{ot_cpu:>8.1f}")
print(f"{'reference (PyTorch ' + r['torch'] + ')':<34}{r['seconds_per_step']:>9.2f}{r['cells_per_s']:>9.2f}{rt_mb:>8.0f}MB{rt_wall:>9.1f}s{rt_cpu:>8.1f}")
print(f"ratio ours/reference: throughput {o_cps / r['cells_per_s']:.2f}x (>1 = ours faster), peak RSS {ot_mb / rt_mb:.2f}x")
print(f"  ours per step (s): {' '.join(f'{batch / c:.2f}' for c in [l['train/cells_per_s'] for l in train])}")
print(f"  ref  per step (s): {' '.join(f'{t:.2f}' for t in r['step_times'])}")
loss_key = next((k for k in ("train/loss", "train/loss_mse") if k in train[0]), None)
if loss_key:
    print(f"  first-step loss: ours {train[0][loss_key]:.3f}, ref {r['losses'][0]:.3f} (random init; ours the screen, ref random data)")
PYEOF
