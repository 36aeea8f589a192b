#!/usr/bin/env bash
# Peak memory and step time of one whole-human generative training step on the CPU, explicit vs
# blockwise attention, at three cell lengths: configs/pretrain_human.toml's model (d 512,
# 12 layers, 8 heads, d_hid 512, dropout 0.2) and objective (GEP + GEPC, then the cell-prompted
# pass), gen share fixed at 0.25 (the largest pcpt block), every batch full.
#
#   bash benches/attention_memory_bench.sh [WORKDIR] [BATCH] [STEPS] [LENGTHS...]
#
# Peak RSS is /usr/bin/time's maximum resident set of the whole process (model, Adam state,
# loader included); s/step is the median of steps 2..STEPS from metrics.jsonl. A run that does
# not fit under MEM_LIMIT_GB (default 22, of this machine's 24) is reported as such, not run
# into the OOM killer.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-attention-bench}
BATCH=${2:-4}
STEPS=${3:-3}
shift 3 2>/dev/null || shift $#
LENGTHS=${*:-600 1200 2400}
THREADS=${THREADS:-2}
MEM_LIMIT_GB=${MEM_LIMIT_GB:-22}
source benches/whole_human_shards.sh

echo "whole-human generative step (d 512, 12 layers, 8 heads, both passes, gen share 0.25), batch $BATCH, $THREADS threads, CPU"
printf '%-8s %-10s %10s %10s\n' tokens attention "s/step" "peak RSS"
for L in $LENGTHS; do
  for A in explicit blockwise; do
    RUN=$WORK/run-$A-$L
    rm -rf "$RUN"
    ( ulimit -v $((MEM_LIMIT_GB * 1024 * 1024))
      /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$BIN/scgpt-train" --quiet --config configs/pretrain_human.toml \
        --set run.dir="$RUN" --set "data.shards=[\"$WORK/shards\"]" --set valid.label_set='""' \
        --set data.valid_fraction=0.0 --set run.threads="$THREADS" --set run.attention="\"$A\"" \
        --set model.max_seq_len="$L" --set 'train.gen_ratios=[0.25]' --set train.batch_size="$BATCH" \
        --set train.warmup_steps=0 --set train.max_steps="$STEPS" --set train.log_every=1 \
        --set train.eval_every=100000 --set train.save_every=100000 ) > "$WORK/$A-$L.out" 2>&1
    if [ $? -ne 0 ]; then
      printf '%-8s %-10s %10s %10s\n' "$L" "$A" "-" "> ${MEM_LIMIT_GB} GiB (did not fit)"
      continue
    fi
    python3 - "$RUN" "$BATCH" "$(cat "$WORK/time.txt")" "$L" "$A" <<'PYEOF'
import json, statistics, sys
run, batch, (wall, kb), L, A = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5]
cps = [json.loads(l).get("train/cells_per_s") for l in open(f"{run}/metrics.jsonl")]
cps = [c for c in cps if c][1:]
step = batch / statistics.median(cps) if cps else float("nan")
print(f"{L:<8} {A:<10} {step:>10.1f} {int(kb) / 1024 / 1024:>8.2f} GiB")
PYEOF
  done
done
