#!/usr/bin/env bash
# `scgpt eval integration` against scib 1.1.7's `scib.metrics.metrics(...)` as the scGPT
# integration tutorial calls it (NMI, ARI, ASW_label, ASW_label/batch, PCR_batch, graph_conn;
# no LISI), on the same synthetic h5ad, same thread count; prints wall time, CPU time, peak RSS,
# the ratio and both sides' metrics. Ours runs twice: with --no-lisi --no-umap (the same metric
# set as scib's call, the ratio) and with graph iLISI/cLISI and the UMAP picture (for
# information: scib's call draws no UMAP, which at 100k cells is most of our end-to-end time).
#
#   bash benches/eval_integration_bench.sh [WORKDIR] [CELLS...]
#
# WORKDIR  default /tmp/scgpt-eval-integration-bench
# CELLS    default "10000": one run per size (e.g. "10000 100000")
# DIMS     environment, default 512 (scGPT's embedding size)
# THREADS  environment, default 2 (rayon for ours; OpenMP/BLAS/numba threads for scib)
# SC_PY    environment, default /work/venv-sc/bin/python: scib 1.1.7, scanpy, leidenalg
# SCIB_MAX environment, default 30000: sizes above it run ours only (scib's ten leidenalg runs
#          and its silhouettes take ~25 min at 100k cells on 2 cores)
#
# The data (benches/eval_integration_reference.py make): pbmc68k_reduced's 700 PBMCs resampled
# to CELLS, a DIMS-d L2-normalised embedding with a planted batch shift in obsm["X_emb"], the
# 765-gene raw matrix as X (PCR's unintegrated side), 10 labels, 4 batches.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-eval-integration-bench}
shift || true
SIZES=${*:-10000}
DIMS=${DIMS:-512}
THREADS=${THREADS:-2}
SC_PY=${SC_PY:-/work/venv-sc/bin/python}
SCIB_MAX=${SCIB_MAX:-30000}
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$WORK"
cargo build --release -p scgpt-cli

measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1 || {
    cat "$WORK/$label.out" >&2; exit 1; }
  echo "$label $(cat "$WORK/time.txt")"
}

for N in $SIZES; do
  H5=$WORK/bench_${N}_${DIMS}.h5ad
  [ -f "$H5" ] || "$SC_PY" benches/eval_integration_reference.py make --cells "$N" --dims "$DIMS" --out "$H5"
  rm -rf "$WORK/ours_$N" "$WORK/ours_lisi_$N"
  OURS=$(measure "ours_$N" env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt" eval integration --input "$H5" \
    --embedding X_emb --label-col label --batch-col batch --no-lisi --no-umap --report "$WORK/ours_$N")
  OURS_LISI=$(measure "ours_lisi_$N" env RAYON_NUM_THREADS="$THREADS" "$BIN/scgpt" eval integration --input "$H5" \
    --embedding X_emb --label-col label --batch-col batch --report "$WORK/ours_lisi_$N")
  if [ "$N" -le "$SCIB_MAX" ]; then
    REF=$(measure "scib_$N" env OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" \
      NUMBA_NUM_THREADS="$THREADS" "$SC_PY" benches/eval_integration_reference.py run --input "$H5")
  else
    REF="skipped"
  fi
  python3 - "$OURS" "$OURS_LISI" "$REF" "$WORK" "$N" "$DIMS" "$THREADS" <<'PYEOF'
import json, sys
ours, ours_lisi, ref, work, n, dims, threads = sys.argv[1:8]
def parse(s):
    label, wall, kb, user, sys_ = s.split()
    return label, float(wall), int(kb) / 1024, float(user) + float(sys_)
mine = json.load(open(f"{work}/ours_{n}/metrics.json"))
print(f"\n== {n} cells x {dims} dims, {threads} threads ==")
print(f"{'run':<18}{'wall s':>9}{'CPU s':>9}{'peak MB':>9}")
rows = [parse(ours), parse(ours_lisi)] + ([] if ref == "skipped" else [parse(ref)])
for label, wall, mb, cpu in rows:
    print(f"{label:<18}{wall:>9.1f}{cpu:>9.1f}{mb:>9.0f}")
print(f"ours, stages (s): {json.dumps({k: round(v, 2) for k, v in mine['seconds'].items()})}")
if ref == "skipped":
    print("scib: skipped (SCIB_MAX)")
    sys.exit(0)
ref_json = json.loads(open(f"{work}/scib_{n}.out").read().strip().splitlines()[-1])
print(f"scib.metrics.metrics alone (h5ad read excluded): {ref_json['seconds']:.1f} s")
print(f"ratio scib / ours (wall, same metrics): {rows[2][1] / rows[0][1]:.2f}x; "
      f"vs scib's call alone: {ref_json['seconds'] / rows[0][1]:.2f}x; peak RSS ours/scib {rows[0][2] / rows[2][2]:.2f}")
print(f"{'metric':<20}{'ours':>10}{'scib':>10}")
for k in ["NMI_cluster/label", "ARI_cluster/label", "ASW_label", "ASW_label/batch", "PCR_batch", "graph_conn"]:
    a, b = mine.get(k), ref_json["metrics"].get(k)
    fa = "null" if a is None else f"{a:.4f}"
    fb = "null" if b is None else f"{b:.4f}"
    print(f"{k:<20}{fa:>10}{fb:>10}")
PYEOF
done
