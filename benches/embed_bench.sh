#!/usr/bin/env bash
# `scgpt embed` against the original's embed_data (PyTorch, CPU) on the whole-human architecture
# (vocabulary 60,697, d 512, 12 layers, 8 heads, d_hid 512), same random weights, same cells,
# same thread count, in one run; prints throughput, peak RSS and the ratio.
#
#   bash benches/embed_bench.sh [WORKDIR] [CELLS] [BATCH]
#
# WORKDIR  default /tmp/scgpt-embed-bench (checkpoint ~205 MB + data)
# CELLS    default 128 simulated cells with ~1,500 expressed genes each, so every cell is
#          subsampled to the 1,200-token cap (both sides), i.e. the longest input
# BATCH    default 64 (the original's default), both sides
# THREADS  environment, default 2: rayon threads for ours, torch.set_num_threads for the original
#          (whose DataLoader also forks min(cores, batch) worker processes for binning, as it does)
# TORCH_PY environment, default /work/venv-torch/bin/python: a venv with torch, numpy, tqdm,
#          anndata and `pip install --no-deps scgpt==0.2.4`
#
# The random checkpoint is written by the original's code (tests/gen/model/gen_whole_human_random.py),
# with the real checkpoint's key names; vocab.json is the shipped whole-human vocabulary.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-embed-bench}
CELLS=${2:-128}
BATCH=${3:-64}
THREADS=${THREADS:-2}
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$WORK"

cargo build --release -p scgpt-cli -p scgpt-prep
MODEL=$WORK/whole_human_random
if [ ! -f "$MODEL/best_model.pt" ]; then
  "$TORCH_PY" tests/gen/model/gen_whole_human_random.py --out "$MODEL" --batch 2 --len 16
fi
[ -f "$MODEL/vocab.json" ] || gzip -dc data/vocab_human.json.gz > "$MODEL/vocab.json"
SIM=$WORK/sim_$CELLS.h5ad
[ -f "$SIM" ] || "$BIN/scgpt-prep" simulate --cells "$CELLS" --genes 20000 --genes-per-cell 1500 --seed 1 --out "$SIM" --quiet

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}

OURS=$(measure ours env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt" embed --model "$MODEL" --input "$SIM" \
  --output "$WORK/ours.npy" --gene-col feature_name --batch-size "$BATCH" --threads "$THREADS" --quiet)
REF=$(measure original env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$TORCH_PY" benches/embed_reference.py \
  --model "$MODEL" --h5ad "$SIM" --out "$WORK/original.npy" --threads "$THREADS" --batch-size "$BATCH")
echo "--- scgpt embed"; cat "$WORK/ours.out"
echo "--- original embed_data"; grep -v 'Embedding cells' "$WORK/original.out" || true

"$TORCH_PY" - "$OURS" "$REF" "$WORK" "$CELLS" "$BATCH" "$THREADS" <<'PYEOF'
import json, re, sys
import numpy as np
ours, ref, work, cells, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
def parse(s):
    label, wall, kb, user, sys_ = s.split()
    return float(wall), int(kb) / 1024, float(user) + float(sys_)
o_wall, o_mb, o_cpu = parse(ours)
r_wall, r_mb, r_cpu = parse(ref)
m = re.search(r"embedded (\d+) cells .* in ([\d.]+)s .*mean (\d+) tokens/cell", open(f"{work}/ours.out").read())
o_embed, tokens = float(m.group(2)), int(m.group(3))
r = json.loads([l for l in open(f"{work}/original.out") if l.startswith("{")][-1])
r_embed = r["wall_embed_s"]
print(f"\nwhole-human architecture, random weights; {cells} cells, {tokens} tokens/cell (cap 1200), "
      f"batch {batch}, {threads} threads, CPU")
print(f"{'':<34}{'embed loop':>12}{'cells/s':>9}{'end to end':>12}{'cells/s':>9}{'CPU s':>8}{'peak RSS':>10}")
for name, emb, wall, cpu, mb in [("scgpt embed (burn flex)", o_embed, o_wall, o_cpu, o_mb),
                                 ("original (PyTorch " + r["torch"] + ")", r_embed, r_wall, r_cpu, r_mb)]:
    print(f"{name:<34}{emb:>11.1f}s{cells / emb:>9.2f}{wall:>11.1f}s{cells / wall:>9.2f}{cpu:>8.1f}{mb:>8.0f}MB")
print(f"ratio ours/original: embed loop {r_embed / o_embed:.2f}x, end to end {r_wall / o_wall:.2f}x "
      f"(>1 = ours faster); peak RSS {o_mb / r_mb:.2f}x")
a, b = np.load(f"{work}/ours.npy"), np.load(f"{work}/original.npy")
cos = (a * b).sum(1)
print(f"agreement (different random subsets of ~1500 genes per cell on each side, so not equal): "
      f"cosine ours vs original mean {cos.mean():.4f}, min {cos.min():.4f}")
PYEOF
