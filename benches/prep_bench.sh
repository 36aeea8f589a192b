#!/usr/bin/env bash
# scgpt-prep throughput and peak memory against the original's Python path, in one run.
#
#   bash benches/prep_bench.sh [WORKDIR] [CELLS] [PY_CELLS]
#
# Simulates CELLS cells (default 1,000,000) with ~2,000 expressed genes each (and a quarter-size
# file, to show memory stays flat as the file grows), shards both with the release scgpt-prep on
# all cores, then runs the Python reference (benches/prep_python_reference.py, single-threaded as
# the original) on the first PY_CELLS cells (default 20,000) of the big file, and prints the ratio
# per core. Needs ~20 GB of disk in WORKDIR for 1M cells. SETTLE_S (default 20) sets the pause
# before each measured run.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/scgpt-prep-bench}
CELLS=${2:-1000000}
PY_CELLS=${3:-20000}
QUARTER=$((CELLS / 4))
mkdir -p "$WORK"
cargo build --release -p scgpt-prep
PREP=target/release/scgpt-prep
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q -r tests/py/requirements.txt scanpy==1.11.5
  .venv-bench/bin/pip install -q --no-deps scgpt==0.2.4
fi
for n in "$QUARTER" "$CELLS"; do
  [ -f "$WORK/sim_$n.h5ad" ] || $PREP simulate --cells "$n" --genes 20000 --genes-per-cell 2000 --seed 1 --out "$WORK/sim_$n.h5ad"
done
NCPU=$(nproc)
# Each run starts cold and on a quiet disk: the page cache dropped where permitted (root), and
# SETTLE_S seconds (default 20) after the previous run. On the benchmark VM a run started right
# after another prep run was 3-4 s slower than one started 20 s later (the disk still busy
# with the previous run's aftermath, outside this VM's view), whichever binary ran.
SETTLE_S=${SETTLE_S:-20}
settle() {
  sync
  [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches
  sleep "$SETTLE_S"
}
measure() { # $1 = label, rest = command; prints "label wall_s peak_kb user_s sys_s"
  local label=$1; shift
  settle
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1
  echo "$label $(cat "$WORK/time.txt")"
}
rm -rf "$WORK/out_q" "$WORK/out_full" "$WORK/out_py"
RQ=$(measure rust_quarter $PREP --input "$WORK/sim_$QUARTER.h5ad" --out "$WORK/out_q" --gene-col feature_name --quiet)
RF=$(measure rust_full $PREP --input "$WORK/sim_$CELLS.h5ad" --out "$WORK/out_full" --gene-col feature_name --quiet)
PY=$(measure python .venv-bench/bin/python benches/prep_python_reference.py --h5ad "$WORK/sim_$CELLS.h5ad" --cells "$PY_CELLS" --out "$WORK/out_py")
echo "$RQ"; echo "$RF"; echo "$PY"; cat "$WORK/python.out"
python3 - "$CELLS" "$QUARTER" "$PY_CELLS" "$NCPU" "$RQ" "$RF" "$PY" <<'PYEOF'
import sys
cells, quarter, py_cells, ncpu = map(int, sys.argv[1:5])
rows = {}
for s in sys.argv[5:8]:
    label, wall, kb, user, sys_ = s.split()
    rows[label] = (float(wall), int(kb), float(user) + float(sys_))
def line(name, n, key, cores):
    wall, kb, cpu = rows[key]
    print(f"{name:<11} {n:>9} cells  {wall:8.1f} s wall  {n / wall:9.0f} cells/s ({cores})  "
          f"{n / cpu:9.0f} cells per CPU-second  peak {kb / 1024:6.0f} MB")
line("scgpt-prep", cells, "rust_full", f"{ncpu} cores")
line("scgpt-prep", quarter, "rust_quarter", f"{ncpu} cores")
line("python ref", py_cells, "python", "1 core")
r_wall, r_kb, r_cpu = rows["rust_full"]
p_wall, p_kb, p_cpu = rows["python"]
print(f"ratio, wall clock per core: {cells / r_wall / ncpu / (py_cells / p_wall):.1f}x   "
      f"per CPU-second: {cells / r_cpu / (py_cells / p_cpu):.1f}x   "
      f"total wall: {cells / r_wall / (py_cells / p_wall):.1f}x   "
      f"peak memory, 4x file / 1x file: {r_kb / rows['rust_quarter'][1]:.2f}")
PYEOF
