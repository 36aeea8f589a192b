#!/usr/bin/env bash
# `scgpt predict-perturbation` throughput against the original's prediction (Tutorial_Perturbation's
# `predict()`: GEARS's control-cell pools and `TransformerGenerator.pred_perturb`, PyTorch on the
# CPU), same model size, same cells x genes, same thread count, in one run; prints conditions/s,
# cells/s, peak RSS and the ratio.
#
#   bash benches/predict_perturb_bench.sh [WORKDIR]
#
# Screen: `scgpt-prep simulate-perturbation` with GENES (1,000) genes (GEARS format, symbols in
# var["gene_name"]). Model: a tiny generator (d 64, 4 heads, d_hid 64, 2 layers; vocabulary =
# `<pad>`, `<cls>`, `<eoc>` + the screen's genes) trained from scratch for TRAIN_STEPS steps by
# `scgpt-train --config configs/finetune_perturbation.toml` (its best_model/, written by the
# validation after the last step). Conditions: every screen gene's single, "G+ctrl", GENES of
# them (COND to take the first N only). Each condition: POOL control cells (GEARS draws them
# with replacement), every screen gene a token (include_zero_gene "all"), 64 cells a forward,
# the mean over the pool.
#
# POOL: GEARS's and our default is 300 control cells a condition, i.e. 300,000 cells of 1,000
# tokens for 1,000 conditions: hours on 2 cores for either side. The default here is 10 (10,000
# cells); the per-cell cost does not depend on the pool size beyond the last, partial batch
# (10 cells: one batch of 10 per condition on both sides).
#
# Ours: the whole command (model load, h5ad read, every prediction, h5ad write). The reference
# (benches/predict_perturb_reference.py): the tutorial's predict() loop, timed on its own (model
# build and the anndata read outside it; the process's wall time is printed too); it does not
# write its predictions.
#
# WORKDIR     default /tmp/scgpt-predict-perturb-bench
# THREADS     environment, default 2 (rayon for ours, torch.set_num_threads for the reference)
# POOL        environment, default 10 control cells per condition
# GENES       environment, default 1000 screen genes
# COND        environment, default 0 = every gene's single
# TRAIN_STEPS environment, default 5
# TORCH_PY    environment, default /work/venv-torch/bin/python (torch, anndata, scgpt 0.2.4)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-predict-perturb-bench}
THREADS=${THREADS:-2}
POOL=${POOL:-10}
GENES=${GENES:-1000}
COND=${COND:-0}
TRAIN_STEPS=${TRAIN_STEPS:-5}
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release
D=64; HEADS=4; DHID=64; LAYERS=2
mkdir -p "$WORK"
cargo build --release -p scgpt-cli -p scgpt-prep
SIM=$WORK/screen_${GENES}.h5ad
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate-perturbation --out "$SIM" --genes "$GENES" \
  --perturbed-genes 24 --doubles 10 --cells-per-condition 20 --control-cells 400 --seed 11 --quiet
RUN=$WORK/run_${GENES}
if [ ! -f "$RUN/best_model/vocab.json" ]; then
  rm -rf "$RUN"
  env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt-train" --quiet \
    --config configs/finetune_perturbation.toml \
    --set run.dir="\"$RUN\"" --set data.input="\"$SIM\"" \
    --set model.init_from='""' --set 'model.init_prefixes=[]' --set run.threads="$THREADS" \
    --set model.embsize=$D --set model.nheads=$HEADS --set model.d_hid=$DHID \
    --set model.nlayers=$LAYERS --set model.max_seq_len="$GENES" \
    --set train.batch_size=16 --set train.lr=1e-3 --set train.max_steps="$TRAIN_STEPS" \
    --set train.log_every=1 --set train.save_every=100000 > "$WORK/train.out" 2>&1 || {
      cat "$WORK/train.out" >&2; exit 1; }
fi
CONDS=$(python3 -c '
import json, sys
genes = json.load(open(sys.argv[1]))["genes"]
n = int(sys.argv[2]) or len(genes)
print(",".join(g + "+ctrl" for g in genes[:n]))' "$RUN/best_model/screen.json" "$COND")
NCOND=$(echo "$CONDS" | tr ',' '\n' | wc -l)

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}

OURS=$(measure ours_predict env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt" predict-perturbation \
  --model "$RUN/best_model" --input "$SIM" --conditions "$CONDS" --output "$WORK/pred.h5ad" \
  --pool-size "$POOL" --batch-size 64)
REF=$(measure ref_predict env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" \
  benches/predict_perturb_reference.py --input "$SIM" --vocab "$RUN/best_model/vocab.json" \
  --conditions "$COND" --pool "$POOL" --batch 64 --d $D --heads $HEADS --d-hid $DHID \
  --layers $LAYERS --threads "$THREADS")

python3 - "$OURS" "$REF" "$WORK" "$THREADS" "$NCOND" "$POOL" "$GENES" <<'PYEOF'
import json, sys
ot, rt, work = sys.argv[1:4]
threads, ncond, pool, genes = map(int, sys.argv[4:8])
def parse(s):
    _, wall, kb, user, sys_ = s.split()
    return float(wall), int(kb) / 1024, float(user) + float(sys_)
ot_wall, ot_mb, ot_cpu = parse(ot)
rt_wall, rt_mb, rt_cpu = parse(rt)
r = json.loads([l for l in open(f"{work}/ref_predict.out") if l.startswith("{")][-1])
assert r["conditions"] == ncond and r["genes"] == genes and r["pool"] == pool, r
cells = ncond * pool
print(f"\npredict-perturbation: {ncond} single conditions x pool {pool} = {cells} cells of "
      f"{genes} tokens, d 64, 2 layers, 4 heads, d_hid 64, vocab {r['ntoken']}, batch 64, "
      f"{threads} threads, CPU")
print(f"{'':<40}{'wall':>9}{'cond/s':>9}{'cells/s':>9}{'peak RSS':>10}{'CPU s':>8}")
print(f"{'scgpt predict-perturbation (whole run)':<40}{ot_wall:>8.1f}s{ncond / ot_wall:>9.2f}{cells / ot_wall:>9.1f}{ot_mb:>8.0f}MB{ot_cpu:>8.1f}")
print(f"{'reference predict() loop':<40}{r['loop_s']:>8.1f}s{r['conditions_per_s']:>9.2f}{r['cells_per_s']:>9.1f}{rt_mb:>8.0f}MB{rt_cpu:>8.1f}")
print(f"{'  (reference process)':<40}{rt_wall:>8.1f}s")
print(f"ratio ours/reference: throughput {r['loop_s'] / ot_wall:.2f}x (>1 = ours faster; ours whole run "
      f"vs its loop), per CPU-second {rt_cpu / ot_cpu:.2f}x, peak RSS {ot_mb / rt_mb:.2f}x")
PYEOF
