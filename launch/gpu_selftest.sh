#!/usr/bin/env bash
# GPU self-test: the model's parity fixtures on the GPU, a world-size-1 NCCL all-reduce, and a
# short whole-human pretraining run (1,200 tokens) printing cells/s and model TFLOP/s.
#
#   bash launch/gpu_selftest.sh pack   # on a build machine with the registries (no GPU needed)
#   bash launch/gpu_selftest.sh run    # on the GPU machine, from the repository root
#   bash launch/gpu_selftest.sh lavapipe   # no GPU: the Vulkan kernels on Mesa's software Vulkan
#
# Why two halves: burn's `cuda` feature downloads an LLVM bundle while it builds, so a GPU
# machine without network cannot build it. `pack` builds the Vulkan variant (wgpu on Vulkan,
# no download) of scgpt-train and scgpt-prep, the parity and generative test binaries and the
# NCCL check, and packs them into
# gpu-carry/bundle.tar.xz (ignored by git; the device tool carries at most 64 MiB). `run`
# unpacks it and needs only the NVIDIA driver (Vulkan ICD, libcuda) and, for the NCCL check,
# libnccl.so on LD_LIBRARY_PATH (a link to libnccl.so.2, e.g. from the `nvidia-nccl-cu12` wheel: see
# docs/distributed.md). Each check prints PASS or FAIL; the script exits non-zero on a FAIL.
#
# Environment: DEVICE (vulkan), STEPS (20), BATCH (32), CELLS (4096) for the pretraining run.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
CARRY=gpu-carry
TD=target-vulkan

pack() {
  set -e
  export CARGO_TARGET_DIR=$TD
  cargo build --release -p scgpt-cli -p scgpt-prep --features scgpt-cli/vulkan
  cargo build --release -p scgpt-dist --features nccl --example nccl_check
  # The test binaries of the model crate, built for Vulkan; cargo prints their paths.
  cargo test --release -p scgpt-model --features vulkan --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"] \
       and m["target"]["name"] in ("parity", "generative"):
        print(m["target"]["name"], m["executable"])' > "$TD/parity-tests.txt"
  rm -rf "$CARRY/stage" && mkdir -p "$CARRY/stage/bin"
  # scgpt-train alone is ~20 MB compressed (burn + wgpu): the bundle holds what the checks run.
  cp "$TD/release/scgpt-train" "$TD/release/scgpt-prep" "$TD/release/examples/nccl_check" "$CARRY/stage/bin/"
  while read -r name exe; do cp "$exe" "$CARRY/stage/bin/test-$name"; done < "$TD/parity-tests.txt"
  strip "$CARRY"/stage/bin/* 2>/dev/null || true
  XZ_OPT="-9 -T0" tar -C "$CARRY/stage" -cJf "$CARRY/bundle.tar.xz" bin
  rm -rf "$CARRY/stage"
  local mib=$(( $(stat -c %s "$CARRY/bundle.tar.xz") / 1048576 ))
  echo "gpu_selftest: packed $CARRY/bundle.tar.xz (${mib} MiB): $(cut -d' ' -f1 "$TD/parity-tests.txt" | tr '\n' ' ')"
  if [ "$mib" -ge 64 ]; then echo "gpu_selftest: bundle is over the 64 MiB carry limit" >&2; exit 1; fi
}

run() {
  local dev=${DEVICE:-vulkan} steps=${STEPS:-20} batch=${BATCH:-32} cells=${CELLS:-4096}
  local bin=$CARRY/bin fail=0 work=${WORK:-/tmp/scgpt-gpu-selftest}
  [ -f "$CARRY/bundle.tar.xz" ] || { echo "gpu_selftest: no $CARRY/bundle.tar.xz; run 'pack' first" >&2; exit 2; }
  rm -rf "$bin" && tar -C "$CARRY" -xJf "$CARRY/bundle.tar.xz"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "== parity fixtures on $dev (the original's outputs, 1e-4)"
  for t in "$bin"/test-*; do
    if SCGPT_TEST_DEVICE=$dev SCGPT_TEST_DATA=$PWD/tests/data/model "$t" --test-threads 1 -q; then
      echo "gpu_selftest: PASS $(basename "$t")"
    else
      echo "gpu_selftest: FAIL $(basename "$t")"; fail=1
    fi
  done
  echo "== NCCL all-reduce, world size 1"
  "$bin/nccl_check" || fail=1
  echo "== whole-human pretraining on $dev: 12 layers, d 512, 1,200 tokens, batch $batch, $steps steps"
  mkdir -p "$work"
  [ -f "$work/sim.h5ad" ] || "$bin/scgpt-prep" simulate --cells "$cells" --genes 20000 --genes-per-cell 1500 --seed 5 --out "$work/sim.h5ad" --quiet
  [ -f "$work/shards/manifest.json" ] || "$bin/scgpt-prep" --input "$work/sim.h5ad" --gene-col feature_name --out "$work/shards" --quiet
  rm -rf "$work/run"
  if "$bin/scgpt-train" --config configs/pretrain_human.toml --quiet \
      --set run.device="\"$dev\"" --set run.dir="\"$work/run\"" --set "data.shards=[\"$work/shards\"]" \
      --set data.weights='[]' --set data.valid_fraction=0.0 --set valid.label_set='""' \
      --set train.batch_size="$batch" --set train.max_steps="$steps" --set train.warmup_steps=2 \
      --set train.log_every=5 --set train.eval_every=100000 --set train.save_every=100000; then
    python3 - "$work/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train/cells_per_s" in l]
late = rows[1:] or rows  # the first interval includes kernel compilation
cps = sum(r["train/cells_per_s"] for r in late) / len(late)
tf = sum(r["train/model_tflops"] for r in late) / len(late)
rss = max(r.get("system/rss_mb", 0) for r in rows)
print(f"gpu_selftest: PASS pretraining: {cps:.1f} cells/s, {tf:.2f} model TFLOP/s (encoder, fwd+bwd), "
      f"last loss {rows[-1]['train/loss']:.3f}, host RSS {rss:.0f} MB")
PY
  else
    echo "gpu_selftest: FAIL pretraining"; fail=1
  fi
  exit $fail
}

# The GPU backend's kernels on the CPU: burn's Vulkan backend (cubecl SPIR-V) on Mesa's
# software Vulkan driver (lavapipe, Debian's `mesa-vulkan-drivers`), device "vulkan-cpu". Slow
# (minutes for the build, the kernels JIT-compiled per shape), so not in CI; the point is that the
# first real GPU run meets kernels whose numerics are already known to match the original.
lavapipe() {
  export CARGO_TARGET_DIR=$TD
  local fail=0 work=${WORK:-/tmp/scgpt-lavapipe} steps=${STEPS:-2}
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || {
    echo "gpu_selftest: no lavapipe ICD; apt-get install mesa-vulkan-drivers" >&2; exit 2; }
  echo "== parity fixtures on vulkan-cpu (the original's outputs, 1e-4)"
  for t in parity generative; do
    if SCGPT_TEST_DEVICE=vulkan-cpu cargo test --release -q -p scgpt-model --features vulkan --test "$t" -- --test-threads 1; then
      echo "gpu_selftest: PASS $t"
    else
      echo "gpu_selftest: FAIL $t"; fail=1
    fi
  done
  echo "== tiny generative pretraining on vulkan-cpu, $steps steps, explicit and blockwise attention"
  cargo build --release -q -p scgpt-cli -p scgpt-prep --features scgpt-cli/vulkan || exit 1
  mkdir -p "$work"
  [ -f "$work/shards/manifest.json" ] || "$TD/release/scgpt-prep" --input tests/data/wu2020_200.h5ad --out "$work/shards" --quiet
  for att in explicit blockwise; do
    rm -rf "$work/run-$att"
    if "$TD/release/scgpt-train" --config configs/pretrain_tiny.toml --quiet \
        --set run.device='"vulkan-cpu"' --set run.dir="\"$work/run-$att\"" --set "data.shards=[\"$work/shards\"]" \
        --set run.attention="\"$att\"" --set valid.label_set='""' --set train.max_steps="$steps" --set train.log_every=1; then
      python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if "train/loss" in l]; print("gpu_selftest: PASS training (" + sys.argv[2] + "): losses", [round(x["train/loss"],3) for x in r])' "$work/run-$att/metrics.jsonl" "$att"
    else
      echo "gpu_selftest: FAIL training ($att)"; fail=1
    fi
  done
  exit $fail
}

case "$MODE" in
  pack) pack ;;
  run) run ;;
  lavapipe) lavapipe ;;
  *) echo "usage: bash launch/gpu_selftest.sh pack|run|lavapipe" >&2; exit 2 ;;
esac
