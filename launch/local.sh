#!/usr/bin/env bash
# N data-parallel ranks of scgpt-train on this machine, like `torchrun --nproc_per_node N`:
#   launch/local.sh 4 --config configs/pretrain_tiny.toml [--set ...]
# Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT
# (or yours). CPU ranks talk over TCP; a CUDA build (`--set run.device=cuda`) uses NCCL, one
# GPU per LOCAL_RANK. Ctrl-C / SIGTERM are passed to every rank (each writes its checkpoint
# through rank 0 and exits); if a rank fails, the others stop with an error naming it.
# SCGPT_TRAIN overrides the binary (default target/release/scgpt-train).
set -uo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: launch/local.sh N <scgpt-train arguments>" >&2
  exit 2
fi
N=$1; shift
cd "$(dirname "$0")/.."
BIN=${SCGPT_TRAIN:-${CARGO_TARGET_DIR:-target}/release/scgpt-train}
[ -x "$BIN" ] || { echo "launch/local.sh: $BIN not found; cargo build --release first" >&2; exit 2; }
PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# Threads per rank: the cores shared out, unless the caller chose.
CORES=$(nproc)
PER=$(( CORES / N > 0 ? CORES / N : 1 ))
pids=()
for ((r = 0; r < N; r++)); do
  RANK=$r WORLD_SIZE=$N LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
    RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$PER} "$BIN" "$@" &
  pids+=($!)
done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; rc=$?
  # wait returns early when a trapped signal arrives; wait again for the real exit.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
done
exit $status
