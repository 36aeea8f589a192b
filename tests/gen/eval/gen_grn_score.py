#!/usr/bin/env python3
"""Generate crates/scgpt-eval/tests/data/grn_score.json: gene-program activity as scGPT's
`GeneEmbedding.score_metagenes` computes it, the truth for `scgpt_eval::grn::score_genes` and
`program_activity` (test: crates/scgpt-eval/tests/grn_score.rs).

scanpy and scGPT are imported, not copied: `sc.tl.score_genes` (scanpy 1.11.5: control genes
drawn per expression bin of the gene list with numpy's legacy global RandomState seeded 0;
`ctrl_size`, `n_bins`), and `GeneEmbedding.score_metagenes` from scgpt 0.2.4's
`scgpt/tasks/grn.py` (loaded on its own; the package __init__ needs torch), which scores each
program and min-max scales the scores with scikit-learn's MinMaxScaler. The per-cell-type means
follow `GeneEmbedding.plot_metagenes_scores` (np.mean of each type's scaled scores); that method
only draws, so the generator computes its matrix the way it does.

The data (numpy Generator(7)): 60 cells of 4 types × 1,400 genes, negative-binomial counts with
log-normal gene means (so every expression bin has genes), 150 genes zero in every cell (a tie
at mean 0 that the rank binning must keep), a few all-but-one-cell zero genes; then scanpy's
normalize_total(1e4) + log1p, X float32 CSR.

Cases: the defaults (ctrl_size 50, n_bins 25; bins of 58 genes, so control genes are sampled),
ctrl_size 10 with n_bins 10, and ctrl_size 500 (every gene of each bin, no draw). Per case and
program: scanpy's raw scores, the control genes (the union `_score_genes_bins` yields after the
same seeding), the min-max scaled scores of score_metagenes, and the per-type mean table.
Program "3" names two genes that are not in the data (scanpy ignores them).

Usage: /work/venv-sc/bin/python tests/gen/eval/gen_grn_score.py
"""
import glob
import importlib.metadata
import importlib.util
import json
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scanpy.tools import _score_genes as sg
from sklearn.preprocessing import MinMaxScaler

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "crates" / "scgpt-eval" / "tests" / "data" / "grn_score.json"
SCGPT_GRN = os.environ.get("SCGPT_GRN_PY") or glob.glob("/work/venv-torch/lib/python3*/site-packages/scgpt/tasks/grn.py")[0]
N_CELLS, N_GENES, N_ZERO = 60, 1400, 150
TYPES = ["B cell", "CD4 T", "Monocyte", "NK"]


def load_grn():
    spec = importlib.util.spec_from_file_location("scgpt_tasks_grn", SCGPT_GRN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_data():
    rng = np.random.default_rng(7)
    cell_type = rng.integers(0, len(TYPES), N_CELLS)
    mu = np.exp(rng.normal(-2.5, 1.6, N_GENES))
    # Type-specific programs: genes 0-99 up in their type (25 each).
    shift = np.ones((len(TYPES), N_GENES))
    for t in range(len(TYPES)):
        shift[t, t * 25:(t + 1) * 25] = 6.0
    lam = mu[None, :] * shift[cell_type] * rng.lognormal(0, 0.3, (N_CELLS, 1))
    counts = rng.negative_binomial(2, 2 / (2 + lam)).astype(np.float32)
    zero = rng.choice(np.arange(100, N_GENES), N_ZERO, replace=False)
    counts[:, zero] = 0
    counts[5, zero[:3]] = 1  # three genes expressed in one cell only
    counts[counts.sum(1) == 0, 200] = 1
    genes = [f"GENE{g:04d}" for g in range(N_GENES)]
    adata = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    adata.var_names = genes
    adata.obs_names = [f"cell{i}" for i in range(N_CELLS)]
    adata.obs["celltype"] = pd.Categorical([TYPES[t] for t in cell_type])
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.sort_indices()
    return adata, zero


def programs(genes, zero):
    rng = np.random.default_rng(11)
    pick = lambda lo, hi, k: [genes[i] for i in sorted(rng.choice(np.arange(lo, hi), k, replace=False))]
    return {
        "0": [genes[i] for i in range(0, 8)],
        "1": pick(25, 50, 12) + pick(100, N_GENES, 8),
        "2": [genes[zero[0]], genes[zero[5]]] + pick(50, 75, 3),
        "3": pick(75, 100, 6) + ["NOT_A_GENE", "ALSO_MISSING"],
        "4": pick(100, N_GENES, 40),
        "5": [genes[zero[0]], genes[zero[1]], genes[zero[2]], genes[zero[3]], genes[zero[4]]],
    }


def control_genes(adata, gene_list, ctrl_size, n_bins):
    np.random.seed(0)
    gl, pool, get_subset = sg._check_score_genes_args(adata, gene_list, None, use_raw=False, layer=None)
    ctrl = pd.Index([], dtype="string")
    for r in sg._score_genes_bins(gl, pool, ctrl_as_ref=True, ctrl_size=ctrl_size, n_bins=n_bins, get_subset=get_subset):
        ctrl = ctrl.union(r)
    return sorted(adata.var_names.get_indexer(ctrl).tolist())


def main():
    grn = load_grn()
    adata, zero = make_data()
    genes = list(adata.var_names)
    progs = programs(genes, zero)
    cases = []
    for ctrl_size, n_bins in [(50, 25), (10, 10), (500, 25)]:
        raw, ctrl = {}, {}
        for p, gl in progs.items():
            sc.tl.score_genes(adata, gl, ctrl_size=ctrl_size, n_bins=n_bins, score_name="raw")
            raw[p] = adata.obs["raw"].tolist()
            ctrl[p] = control_genes(adata, gl, ctrl_size, n_bins)
        if (ctrl_size, n_bins) == (50, 25):
            # The original workflow, with scanpy's defaults.
            emb = grn.GeneEmbedding({})
            emb.score_metagenes(adata, progs)
        else:
            for p in progs:
                s = np.array(raw[p]).reshape(-1, 1)
                adata.obs[f"{p}_SCORE"] = MinMaxScaler().fit_transform(s).ravel()
        scaled = {p: adata.obs[f"{p}_SCORE"].tolist() for p in progs}
        # plot_metagenes_scores's matrix: per program, per type, np.mean of the scaled scores.
        by_type = {p: {ct: float(np.mean(adata[adata.obs["celltype"] == ct].obs[f"{p}_SCORE"].tolist())) for ct in TYPES} for p in progs}
        cases.append({"ctrl_size": ctrl_size, "n_bins": n_bins, "raw": raw, "control_genes": ctrl, "scaled": scaled, "by_type": by_type})
    X = adata.X
    out = {
        "versions": {p: importlib.metadata.version(p) for p in ["scanpy", "numpy", "pandas", "scipy", "scikit-learn", "anndata"]},
        "scgpt_grn_py": "scgpt 0.2.4 scgpt/tasks/grn.py",
        "n_cells": N_CELLS,
        "n_genes": N_GENES,
        "genes": genes,
        "cell_type": adata.obs["celltype"].astype(str).tolist(),
        "programs": progs,
        "cases": cases,
        "indptr": X.indptr.tolist(),
        "indices": X.indices.tolist(),
        "data": "DATA",
    }
    text = json.dumps(out, separators=(",", ":"))
    text = text.replace('"DATA"', "[" + ",".join(str(np.float32(v)) for v in X.data) + "]")
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); nnz {X.nnz}")


if __name__ == "__main__":
    main()
