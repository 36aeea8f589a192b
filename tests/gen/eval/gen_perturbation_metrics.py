#!/usr/bin/env python3
"""Generate crates/scgpt-eval/tests/data/perturbation_metrics.json: the perturbation metrics as
the originals compute them, the truth for `scgpt_eval::perturbation::evaluate` (test:
crates/scgpt-eval/tests/perturbation_metrics.rs).

Imported, not copied:
- scGPT 0.2.4 `scgpt.utils.util.compute_perturbation_metrics` (pearson, pearson_de,
  pearson_delta, pearson_de_delta; with non_zero_genes=True its `_de` pair uses
  top_non_dropout_de_20, i.e. our pearson_de_nodropout / pearson_de_delta_nodropout);
- GEARS (cell-gears 0.0.2) `gears.inference.non_dropout_analysis`
  (pearson_top20_de_non_dropout, pearson_delta_top20_de_non_dropout).
Modules they import but these functions never use (matplotlib, IPython, scanpy, sklearn) are
stubbed; util.py and inference.py are loaded without their packages' __init__.

The screen (fixed numpy Generator, values rounded to 4 decimals so both sides read the same
float64): 40 genes, 30 control cells, 9 test conditions (singles and doubles) of 4-9 cells with
per-cell truth and prediction, a DE list and a non-dropout list of 20 genes each. Two edge cases:
`ZERO+ctrl` (truth zero everywhere: scGPT skips it in every metric, GEARS scores it 0) and
`DEZERO+ctrl` (truth zero on its 20 DE genes: scGPT skips it in the `_de` metrics only).

Per condition the file holds scGPT's four values (compute_perturbation_metrics on that condition
alone, return_raw=True; a skipped condition has no value), the two non-dropout values from both
originals, and the means scGPT reports over all conditions (return_raw=False).

scGPT's `find_DE_genes` builds every condition's uns key from the *first* key's cell type and dose
(`K562_<condition>_<dose of the first key>`), so with singles (`_1`) and doubles (`_1+1`) in one
screen it looks up keys that do not exist. The fixture keys every condition `K562_<c>_1` (and
gives obs `condition_name` the same) so that both originals find them.

Usage: /work/venv-torch/bin/pip install --no-deps cell-gears==0.0.2   (scgpt==0.2.4 --no-deps too)
       /work/venv-torch/bin/python tests/gen/eval/gen_perturbation_metrics.py
"""
import importlib.metadata
import importlib.util
import json
import logging
import sys
import types
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "crates" / "scgpt-eval" / "tests" / "data" / "perturbation_metrics.json"
N_GENES = 40
CONDITIONS = ["KLF1+ctrl", "CEBPA+ctrl", "BAK1+ctrl", "ETS2+ctrl", "CBL+ctrl", "KLF1+BAK1",
              "CEBPA+ETS2", "ZERO+ctrl", "DEZERO+ctrl"]


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load(module_name, path):
    spec = importlib.util.spec_from_file_location(module_name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_originals():
    for dist, want in [("scgpt", "0.2.4"), ("cell-gears", "0.0.2")]:
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"{dist}=={want} is not installed (pip install --no-deps {dist}=={want})")
        if v != want:
            sys.exit(f"need {dist}=={want}, found {v}")
    plt = stub("matplotlib.pyplot")
    stub("matplotlib", pyplot=plt, axes=stub("matplotlib.axes", Axes=object))
    stub("IPython", get_ipython=lambda: None)
    stub("scanpy")
    stub("sklearn")
    stub("sklearn.metrics", r2_score=None, mean_absolute_error=None,
         mean_squared_error=lambda a, b: float(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))
    stub("scgpt", logger=logging.getLogger("scGPT"), __path__=[])
    stub("scgpt.utils", __path__=[])
    stub("gears", __path__=[])
    util = load("scgpt.utils.util", importlib.metadata.distribution("scgpt").locate_file("scgpt/utils/util.py"))
    inference = load("gears.inference", importlib.metadata.distribution("cell-gears").locate_file("gears/inference.py"))
    return util.compute_perturbation_metrics, inference.non_dropout_analysis


def make_screen():
    gen = np.random.default_rng(5)
    base = np.round(np.abs(gen.normal(1.0, 0.8, N_GENES)), 4)
    base[gen.choice(N_GENES, 6, replace=False)] = 0.0
    ctrl = np.clip(base + gen.normal(0, 0.3, (30, N_GENES)), 0, None)
    ctrl[:, base == 0] = 0.0
    cells, truth, pred, de, nd = [], [], [], {}, {}
    for c in CONDITIONS:
        n = int(gen.integers(4, 10))
        mu = base.copy()
        eff = gen.choice(N_GENES, 8, replace=False)
        mu[eff] = np.abs(mu[eff] + gen.normal(0, 1.5, 8))
        t = np.clip(mu + gen.normal(0, 0.3, (n, N_GENES)), 0, None)
        rank = list(eff) + [j for j in gen.permutation(N_GENES) if j not in eff]
        de[c] = [int(j) for j in rank[:20]]
        nd[c] = [int(j) for j in gen.permutation(N_GENES)[:20]]
        if c == "ZERO+ctrl":
            t[:] = 0.0
        if c == "DEZERO+ctrl":
            t[:, de[c]] = 0.0
            nd[c] = [j for j in range(N_GENES) if j not in de[c]][:20]
        alpha = gen.uniform(0.3, 0.9)
        p = alpha * t.mean(0) + (1 - alpha) * ctrl.mean(0) + gen.normal(0, 0.2, (n, N_GENES))
        cells += [c] * n
        truth.append(t)
        pred.append(p)
    r4 = lambda a: np.round(a, 4)
    return r4(ctrl), np.array(cells), r4(np.vstack(truth)), r4(np.vstack(pred)), de, nd


def main():
    compute_perturbation_metrics, non_dropout_analysis = load_originals()
    ctrl, cells, truth, pred, de, nd = make_screen()
    gene_ids = [f"ENSG{j:05d}" for j in range(N_GENES)]
    key = lambda c: f"K562_{c}_1"
    all_x = np.vstack([ctrl, truth])
    conds = np.array(["ctrl"] * len(ctrl) + list(cells))
    adata = ad.AnnData(
        sp.csr_matrix(all_x),
        obs=pd.DataFrame({"condition": conds, "condition_name": [key(c) for c in conds]},
                         index=[f"c{i}" for i in range(len(conds))]),
        var=pd.DataFrame({"gene_name": [f"gene{j}" for j in range(N_GENES)]}, index=gene_ids),
    )
    adata.uns["rank_genes_groups_cov_all"] = {key(c): np.array([gene_ids[j] for j in de[c]]) for c in CONDITIONS}
    adata.uns["top_non_dropout_de_20"] = {key(c): np.array([gene_ids[j] for j in nd[c]]) for c in CONDITIONS}
    adata.uns["non_zeros_gene_idx"] = {key(c): np.arange(N_GENES) for c in CONDITIONS}
    adata.uns["non_dropout_gene_idx"] = {key(c): np.arange(N_GENES) for c in CONDITIONS}
    ctrl_adata = ad.AnnData(ctrl, var=adata.var.copy(), uns=dict(adata.uns))
    results = {"pert_cat": cells, "truth": truth, "pred": pred}

    per = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in CONDITIONS:
            m = cells == c
            one = {k: v[m] for k, v in results.items()}
            raw = compute_perturbation_metrics(one, ctrl_adata, return_raw=True)
            raw_nd = compute_perturbation_metrics(one, ctrl_adata, non_zero_genes=True, return_raw=True)
            per[c] = {
                "scgpt": {k: (float(v[0]) if len(v) else None) for k, v in raw.items()},
                "scgpt_non_zero_genes": {k: (float(raw_nd[k][0]) if len(raw_nd[k]) else None)
                                         for k in ["pearson_de", "pearson_de_delta"]},
            }
        means = compute_perturbation_metrics(results, ctrl_adata, return_raw=False)
        gears = non_dropout_analysis(adata, results)
    for c in CONDITIONS:
        per[c]["gears"] = {k: float(gears[c][k]) for k in ["pearson_top20_de_non_dropout",
                                                          "pearson_delta_top20_de_non_dropout"]}
    out = {
        "versions": {"scgpt": importlib.metadata.version("scgpt"), "cell-gears": importlib.metadata.version("cell-gears"),
                     "numpy": np.__version__, "scipy": importlib.metadata.version("scipy"),
                     "anndata": importlib.metadata.version("anndata")},
        "n_genes": N_GENES, "conditions": CONDITIONS, "de": de, "de_non_dropout": nd,
        "expected": per, "scgpt_means": {k: float(v) for k, v in means.items()},
    }
    text = json.dumps(out, indent=1)
    rows = lambda a: "[" + ",\n  ".join("[" + ",".join(repr(float(v)) for v in r) + "]" for r in a) + "]"
    text = (text[:-2] + ',\n "control": ' + rows(ctrl) + ',\n "cells": ' + json.dumps(list(cells))
            + ',\n "truth": ' + rows(truth) + ',\n "pred": ' + rows(pred) + "\n}\n")
    json.loads(text)
    OUT.write_text(text)
    print(f"wrote {OUT}; scGPT means: {out['scgpt_means']}")


if __name__ == "__main__":
    main()
