#!/usr/bin/env python3
"""Generate crates/scgpt-eval/tests/data/perturbation_de.json: GEARS's DE genes on a small
planted screen, the truth for `scgpt_eval::perturbation::rank_genes_groups` (test:
crates/scgpt-eval/tests/perturbation_de.rs).

GEARS is imported, not copied: cell-gears 0.0.2's `get_DE_genes` (scanpy's
`rank_genes_groups(groupby='condition_name', reference='K562_ctrl_1', rankby_abs=True,
n_genes=all)` through `rank_genes_groups_by_cov`) and `get_dropout_non_zero_genes`, on an AnnData
built here. The modules GEARS imports but these two never use and the venv lacks (torch,
torch_geometric, dcor, requests) are stubbed and the package is loaded without its __init__.

The screen (fixed numpy Generator): 64 genes, a control of 40 cells and 12 conditions of 10-20
cells (singles and doubles), negative-binomial counts with ~15 shifted genes per condition,
then scanpy's normalize_total(1e4) + log1p in float32 and X as float32 CSR (GEARS's layout).
Planted: genes 0-2 zero in every cell (t = 0/0 → 0), and per condition two genes expressed in the
control but zeroed in the condition (dropouts: strong |t|, kept out of top_non_dropout_de_20),
gene 3 expressed in one condition only (zero in the control: a "true zero" elsewhere).

NUMBA_NUM_THREADS=1: scanpy's sparse mean/variance sums cells in per-thread strides, so its last
bits depend on the thread count; one thread gives the cell-order sums the port computes.

The file holds the CSR matrix (values as float32 decimals), each cell's group, the group names
(GEARS condition strings; the control first), and per condition scanpy's top 20 gene indices, the
float32 scores scanpy stores for them, and GEARS's top_non_dropout_de_20 indices. The generator
checks that no two |t| tie where the lists are cut (ties have no defined order in scanpy).

Usage: /work/venv-sc/bin/pip install --no-deps cell-gears==0.0.2
       /work/venv-sc/bin/python tests/gen/eval/gen_perturbation_de.py
"""
import os

os.environ["NUMBA_NUM_THREADS"] = "1"

import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import scipy.sparse as sp  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "crates" / "scgpt-eval" / "tests" / "data" / "perturbation_de.json"
N_GENES = 64
CONDITIONS = ["KLF1+ctrl", "CEBPA+ctrl", "MAP2K6+ctrl", "BAK1+ctrl", "ETS2+ctrl", "CBL+ctrl",
              "KLF1+MAP2K6", "CEBPA+ETS2", "BAK1+CBL", "DUSP9+ctrl", "DUSP9+KLF1", "SGK1+ctrl"]


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def load_gears_data_utils():
    spec = importlib.util.find_spec("gears")
    if spec is None:
        sys.exit("cell-gears 0.0.2 is not installed: pip install --no-deps cell-gears==0.0.2")
    version = importlib.metadata.version("cell-gears")
    if version != "0.0.2":
        sys.exit(f"need cell-gears==0.0.2, found {version}")
    for name in ["torch", "torch.nn", "torch_geometric", "torch_geometric.data", "dcor", "requests"]:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            sys.modules[name] = _Stub(name)
    if isinstance(sys.modules.get("torch"), _Stub):
        sys.modules["torch"].nn = sys.modules["torch.nn"]
    pkg = types.ModuleType("gears")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["gears"] = pkg
    return importlib.import_module("gears.data_utils"), version


def make_screen():
    gen = np.random.default_rng(11)
    base = np.exp(gen.normal(0.5, 1.0, N_GENES))
    base[:3] = 0.0  # never expressed
    base[3] = 0.0  # expressed only where a condition switches it on
    groups = ["ctrl"] + CONDITIONS
    sizes = [40] + list(gen.integers(10, 21, len(CONDITIONS)))
    counts, cell_group = [], []
    for k, (name, n) in enumerate(zip(groups, sizes)):
        rate = base.copy()
        if k > 0:
            shifted = gen.choice(np.arange(4, N_GENES), 15, replace=False)
            rate[shifted] *= np.exp(gen.normal(0.0, 1.2, 15))
            dropped = gen.choice(np.arange(4, N_GENES), 2, replace=False)
            rate[dropped] = 0.0
            if k == 5:
                rate[3] = 4.0
        lib = gen.lognormal(0.0, 0.3, n)
        lam = gen.gamma(2.0, rate[None, :] * lib[:, None] / 2.0)
        counts.append(gen.poisson(lam))
        cell_group += [k] * n
    counts = np.vstack(counts).astype(np.float32)
    cell_group = np.array(cell_group)
    order = gen.permutation(len(cell_group))  # interleave the groups
    counts, cell_group = counts[order], cell_group[order]
    keep = counts.sum(1) > 0
    counts, cell_group = counts[keep], cell_group[keep]
    obs = pd.DataFrame({
        "condition": [groups[k] for k in cell_group],
        "cell_type": "K562",
    }, index=[f"c{i}" for i in range(len(cell_group))])
    var = pd.DataFrame({"gene_name": [f"gene{j}" for j in range(N_GENES)]},
                       index=[f"ENSG{j:05d}" for j in range(N_GENES)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata, groups, cell_group


def main():
    du, gears_version = load_gears_data_utils()
    adata, groups, cell_group = make_screen()
    X = adata.X.copy()
    du.get_DE_genes(adata)
    du.get_dropout_non_zero_genes(adata)
    # scanpy's scores for the tie check and the record (GEARS keeps only the names)
    ref = adata.copy()
    ref.obs["condition_name"] = ref.obs["condition_name"].astype("category")
    sc.tl.rank_genes_groups(ref, groupby="condition_name", reference="K562_ctrl_1", rankby_abs=True,
                            n_genes=N_GENES, use_raw=False)
    id2idx = {g: j for j, g in enumerate(adata.var.index)}
    expected = {}
    for name in groups[1:]:
        dose = "1+1" if len(name.split("+")) == 2 else "1"
        key = f"K562_{name}_{dose}"
        ranked = [id2idx[g] for g in adata.uns["rank_genes_groups_cov_all"][key]]
        nd = [id2idx[g] for g in adata.uns["top_non_dropout_de_20"][key]]
        names = [id2idx[g] for g in ref.uns["rank_genes_groups"]["names"][key]]
        scores = np.asarray(ref.uns["rank_genes_groups"]["scores"][key], dtype=np.float64)
        assert names == ranked, f"{key}: rerun differs from GEARS's ranking"
        depth = max(20, ranked.index(nd[-1]) + 1)
        cut = np.abs(scores[: depth + 1])
        assert len(np.unique(cut)) == len(cut), f"{key}: tied |t| within the first {depth + 1} genes"
        n_dropout_in_top = sum(1 for j in ranked[:20] if j not in nd)
        expected[name] = {
            "top20": ranked[:20],
            "scores_f32": [float(s) for s in scores[:20]],
            "top_non_dropout_de_20": nd,
            "dropouts_in_top20": n_dropout_in_top,
        }
    out = {
        "versions": {"cell-gears": gears_version, "scanpy": importlib.metadata.version("scanpy"),
                     "anndata": importlib.metadata.version("anndata"), "numpy": np.__version__, "scipy": importlib.metadata.version("scipy"),
                     "pandas": pd.__version__},
        "n_cells": int(X.shape[0]), "n_genes": N_GENES,
        "groups": groups, "control": 0,
        "expected": expected,
    }
    text = json.dumps(out, indent=1)
    # the matrix goes in as float32 decimals on single lines (shortest repr that reads back exactly)
    csr = ('"cell_group": [' + ",".join(str(int(k)) for k in cell_group) + '],\n "indptr": [' + ",".join(str(int(v)) for v in X.indptr) + '],\n "indices": ['
           + ",".join(str(int(v)) for v in X.indices) + '],\n "data": ['
           + ",".join(str(np.float32(v)) for v in X.data) + "]")
    text = text[:-2] + ",\n " + csr + "\n}\n"
    json.loads(text)
    OUT.write_text(text)
    print(f"wrote {OUT}: {X.shape[0]} cells, {X.nnz} values; dropouts in top 20:",
          {k: v["dropouts_in_top20"] for k, v in expected.items()})


if __name__ == "__main__":
    main()
