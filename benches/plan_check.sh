#!/usr/bin/env bash
# The plan's peak memory (`scgpt-train --plan`) against the measured peak RSS of real
# `scgpt-train` steps on the CPU, at three model sizes, explicit and blockwise attention, with
# configs/pretrain_human.toml's objective (generative, both passes, gen share fixed at 0.25).
#
#   bash benches/plan_check.sh [WORKDIR] [STEPS]
#
# Uses the shards of benches/attention_memory_bench.sh (made here if missing).
# PRECISION environment, default fp32: train.precision for both the plan and the run (bf16 =
#           bf16 compute copy, fp32 masters; bf16-pure)
# SIZES     environment: the model sizes to check, ";"-separated "d layers heads d_hid tokens
#           batch" (default the three below)
# REPEAT    environment, default 3: runs per row; the median peak is reported (a sub-GiB
#           process's peak RSS varies by up to ~15% from run to run)
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-attention-bench}
STEPS=${2:-2}
THREADS=${THREADS:-2}
source benches/whole_human_shards.sh

PRECISION=${PRECISION:-fp32}
REPEAT=${REPEAT:-3}
printf '%-34s %-10s %10s %10s %8s  %s\n' "model ($PRECISION)" attention "plan GiB" "meas. GiB" "plan/meas" "range of $REPEAT runs"
# d layers heads d_hid tokens batch
IFS=';' read -r -a SIZE_LIST <<< "${SIZES:-128 2 4 128 600 8;256 4 8 256 1200 4;512 12 8 512 600 4}"
for SIZE in "${SIZE_LIST[@]}"; do
  set -- $SIZE
  for A in explicit blockwise; do
    RUN=$WORK/plan-$1-$2-$A
    rm -rf "$RUN"
    ARGS=(--config configs/pretrain_human.toml --set run.dir="$RUN" --set "data.shards=[\"$WORK/shards\"]"
      --set valid.label_set='""' --set data.valid_fraction=0.0 --set run.threads="$THREADS"
      --set run.attention="\"$A\"" --set model.embsize=$1 --set model.nlayers=$2 --set model.nheads=$3
      --set model.d_hid=$4 --set model.max_seq_len=$5 --set 'train.gen_ratios=[0.25]' --set train.batch_size=$6
      --set train.warmup_steps=0 --set train.max_steps="$STEPS" --set train.log_every=1
      --set train.eval_every=100000 --set train.save_every=100000 --set train.precision="\"$PRECISION\"")
    PLAN=$("$BIN/scgpt-train" "${ARGS[@]}" --plan | sed -n 's/.*peak ≈ \([0-9.]*\) GiB.*/\1/p')
    PEAKS=()
    for ((i = 0; i < REPEAT; i++)); do
      rm -rf "$RUN"
      /usr/bin/time -f "%M" -o "$WORK/time.txt" "$BIN/scgpt-train" --quiet "${ARGS[@]}" > "$WORK/plan.out" 2>&1 || { cat "$WORK/plan.out" >&2; exit 1; }
      PEAKS+=("$(cat "$WORK/time.txt")")
    done
    MEAS=$(printf '%s\n' "${PEAKS[@]}" | sort -n | awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m / 1024 / 1024}')
    RANGE=$(printf '%s\n' "${PEAKS[@]}" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f-%.2f", lo / 1024 / 1024, hi / 1024 / 1024}')
    printf '%-34s %-10s %10s %10s %8.2f  %s\n' "d $1, $2 layers, $5 tokens, batch $6" "$A" "$PLAN" "$MEAS" "$(echo "$PLAN / $MEAS" | bc -l)" "$RANGE"
  done
done
