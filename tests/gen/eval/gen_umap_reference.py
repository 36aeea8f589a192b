#!/usr/bin/env python3
"""Generate tests/data/eval/umap_reference.json, the truth for `scgpt_eval::umap::find_ab_params`
(crates/scgpt-eval/tests/umap_reference.rs): umap-learn's `find_ab_params(spread, min_dist)`,
the curve UMAP's layout attracts and repels with, for scanpy's default (spread 1, min_dist 0.5),
umap-learn's default (min_dist 0.1) and a few others.

Usage: /work/venv-sc/bin/python tests/gen/eval/gen_umap_reference.py
"""
import importlib.metadata
import json
import os
import pathlib
import warnings

warnings.filterwarnings("ignore")
from umap.umap_ import find_ab_params  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[3] / "tests" / "data" / "eval" / "umap_reference.json"
PAIRS = [(1.0, 0.5), (1.0, 0.1), (1.0, 0.0), (1.0, 0.3), (2.0, 0.5), (1.0, 1.0)]

out = {
    "generator": "tests/gen/eval/gen_umap_reference.py",
    "versions": {p: importlib.metadata.version(p) for p in ["umap-learn", "scipy", "numpy"]},
    "find_ab_params": [
        {"spread": s, "min_dist": m, "a": float(a), "b": float(b)}
        for s, m in PAIRS
        for a, b in [find_ab_params(s, m)]
    ],
}
tmp = OUT.with_suffix(".tmp")
with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
os.replace(tmp, OUT)
print(f"wrote {OUT}")
for r in out["find_ab_params"]:
    print(r)
