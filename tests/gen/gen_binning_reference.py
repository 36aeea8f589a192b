#!/usr/bin/env python3
"""Generate tests/data/binning_reference.json from the ORIGINAL scGPT `binning`.

The function is the one shipped in the PyPI wheel scgpt==0.2.4 (scgpt/preprocess.py),
installed into the venv with `pip install --no-deps scgpt==0.2.4`; nothing of it is
copied here. `scgpt/preprocess.py` imports torch, scanpy and the `scgpt` package
(whose __init__ pulls in the model code), none of which `binning` needs, so this script
loads that one file with importlib under minimal stand-ins for those imports.

Output: a JSON list, one object per row:
  name       short description of the row
  values     the input row (float32 values, written exactly as float64 numbers)
  bins       original binning(row, n_bins=51) under np.random.seed(0) (one random draw)
  bins_lo    the bins when every tie-break uniform draw U -> 1 (smallest possible bin)
  bins_hi    the bins when every U = 0 (largest possible bin)
  tie_free   the row's nonzero values are all distinct
For every position bins_lo <= bins <= bins_hi; where bins_lo == bins_hi the bin does not
depend on the random draw (always so when tie_free with >= 2 nonzeros; a single nonzero
value has all 50 edges equal and gets a uniform bin in 1..50). Zeros always map to bin 0.

Usage:  .venv/bin/python tests/gen/gen_binning_reference.py
"""
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "binning_reference.json")
N_BINS = 51
SCGPT_VERSION = "0.2.4"


def load_original_binning():
    version = importlib.metadata.version("scgpt")
    if version != SCGPT_VERSION:
        sys.exit(f"need scgpt=={SCGPT_VERSION} installed (pip install --no-deps), found {version}")
    path = importlib.metadata.distribution("scgpt").locate_file("scgpt/preprocess.py")

    # Stand-ins for imports that `binning`/`_digitize` never use. torch.Tensor must be a
    # class because binning() does isinstance(row, torch.Tensor).
    def stub(name, **attrs):
        if name in sys.modules:
            return
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m

    stub("torch", Tensor=type("Tensor", (), {}))
    stub("scanpy")
    stub("scanpy.get", _get_obs_rep=None, _set_obs_rep=None)
    # a bare `scgpt` package so that `from scgpt import logger` does not run scgpt/__init__.py
    stub("scgpt", logger=logging.getLogger("scGPT"), __path__=[])
    spec = importlib.util.spec_from_file_location("scgpt_preprocess_original", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.binning, str(path)


class FixedRand:
    """Temporarily replace np.random.rand (used by the original _digitize) by a constant."""

    def __init__(self, u):
        self.u = u

    def __enter__(self):
        self.saved = np.random.rand
        np.random.rand = lambda n: np.full(n, self.u)

    def __exit__(self, *exc):
        np.random.rand = self.saved


def rows(rng):
    """Yield (name, float32 row). Data use their own RandomState, not the global RNG."""
    q = 256.0  # tie-free values are multiples of 1/256: exact in f32 and short in JSON

    def distinct_quantised(n, sigma=1.5, scale=20.0):
        vals = set()
        while len(vals) < n:
            x = np.round(rng.lognormal(0.0, sigma, size=2 * n) * scale * q) / q
            vals.update(float(v) for v in x if 0 < v < 60000)
        out = np.array(sorted(vals)[: n * 4], dtype=np.float64)
        out = rng.choice(out, size=n, replace=False)
        return out

    def interleave_zeros(nz, zero_frac):
        n_total = int(round(len(nz) / (1.0 - zero_frac)))
        row = np.zeros(n_total, dtype=np.float32)
        pos = np.sort(rng.choice(n_total, size=len(nz), replace=False))
        row[pos] = nz
        return row

    # 1. tie-free floats with zeros interleaved; sizes around multiples of 49 so that
    #    quantile positions fall exactly on (or within rounding of) data points.
    for n in [5, 6, 10, 20, 48, 49, 50, 51, 52, 97, 99, 100, 148, 245, 246, 491, 1000, 3000]:
        zf = 0.3 if n >= 1000 else 0.5
        yield f"tiefree_zeros_nnz{n}", interleave_zeros(distinct_quantised(n), zf)
    # 2. tie-free float32 values that are not short decimals (log1p-normalised-like)
    for n in [37, 300]:
        nz = np.unique(np.log1p(rng.gamma(0.8, 3.0, size=n * 2)).astype(np.float32))
        nz = nz[nz > 0]
        nz = rng.choice(nz, size=n, replace=False).astype(np.float32)
        yield f"tiefree_log1p_f32_zeros_nnz{n}", interleave_zeros(nz, 0.6)
    # 3. tie-free rows with no zeros (the collator path: nonzero values only)
    for n in [7, 50, 99, 800]:
        yield f"tiefree_nozeros_n{n}", distinct_quantised(n).astype(np.float32)
    # 4. integer counts with many ties (negative-binomial-like), with zeros
    for n, mean, zf in [(30, 1.5, 0.5), (60, 3.0, 0.7), (200, 2.0, 0.8),
                        (1000, 4.0, 0.85), (3000, 1.2, 0.9), (500, 40.0, 0.3)]:
        lam = rng.gamma(0.6, mean / 0.6, size=n)
        counts = rng.poisson(lam).astype(np.float32)
        counts[rng.random(n) < zf] = 0
        if counts.max() == 0:
            counts[0] = 1
        yield f"counts_ties_n{n}_mean{mean:g}", counts
    # 5. integer counts with ties, no zeros
    yield "counts_ties_nozeros_n120", (1 + rng.poisson(1.0, size=120)).astype(np.float32)
    # 6. real cells from tests/data/wu2020_200.h5ad (raw UMI), nonzero values only
    try:
        import h5py

        with h5py.File(os.path.join(ROOT, "tests", "data", "wu2020_200.h5ad"), "r") as f:
            ip = f["X/indptr"][:]
            for cell in [2, 5]:
                d = f["X/data"][ip[cell]:ip[cell + 1]].astype(np.float32)
                yield f"wu2020_200_cell{cell}_nonzero", d
    except (ImportError, OSError) as e:  # fixture missing: skip these rows
        print("skipping wu2020 rows:", e)
    # 7. edge cases
    yield "single_nonzero_with_zeros", np.array([0, 0, 3.5, 0, 0, 0], dtype=np.float32)
    yield "single_value_no_zeros", np.array([7.0], dtype=np.float32)
    yield "two_nonzeros", np.array([0, 2.0, 0, 5.0, 0], dtype=np.float32)
    yield "all_equal_nonzeros", np.array([0, 3, 3, 0, 3, 3, 3, 0], dtype=np.float32)
    yield "all_zero", np.zeros(12, dtype=np.float32)
    yield "two_levels_ties", np.array([1] * 30 + [2] * 5 + [0] * 10, dtype=np.float32)


def main():
    binning, path = load_original_binning()
    print(f"original binning from {path}; numpy {np.__version__}")
    rng = np.random.RandomState(12345)
    np.random.seed(0)  # the global RNG that the original _digitize draws from
    out = []
    for name, row in rows(rng):
        assert row.dtype == np.float32 and row.min() >= 0
        bins = binning(row.copy(), n_bins=N_BINS)
        with FixedRand(0.0):
            hi = binning(row.copy(), n_bins=N_BINS)
        with FixedRand(1.0 - 1e-9):
            lo = binning(row.copy(), n_bins=N_BINS)
        bins, lo, hi = (np.asarray(b).astype(np.int64) for b in (bins, lo, hi))
        nz = row[row != 0]
        tie_free = bool(len(np.unique(nz)) == len(nz))
        assert np.all(lo <= bins) and np.all(bins <= hi)
        assert np.all(bins[row == 0] == 0)
        assert np.all((bins[row != 0] >= 1) & (bins[row != 0] <= N_BINS - 1))
        if tie_free and len(nz) >= 2:  # distinct values give distinct edges: no randomness
            assert np.array_equal(lo, hi), name
        out.append({
            "name": name,
            "values": [float(v) for v in row],
            "bins": bins.tolist(),
            "bins_lo": lo.tolist(),
            "bins_hi": hi.tolist(),
            "tie_free": tie_free,
        })
    text = "[\n" + ",\n".join(json.dumps(e, separators=(",", ":")) for e in out) + "\n]\n"
    with open(OUT, "w") as f:
        f.write(text)
    n_rand = sum(1 for e in out if e["bins_lo"] != e["bins_hi"])
    print(f"wrote {OUT}: {len(out)} rows, {sum(len(e['values']) for e in out)} values, "
          f"{len(text)} bytes; {sum(e['tie_free'] for e in out)} tie-free, "
          f"{n_rand} with random tie-breaking")


if __name__ == "__main__":
    main()
