#!/usr/bin/env python3
"""Generate tests/data/eval/baseline_reference.json: the annotation baseline run by scanpy +
scikit-learn, the truth for crates/scgpt-eval's `annotation_baseline`.

Pipeline (each dataset split into a reference and a query):
  reference: normalize_total(target_sum=1e4), log1p,
             highly_variable_genes(n_top_genes=2000, flavor="seurat") (all genes when <= 2000),
  query:     normalize_total(target_sum=1e4), log1p, the reference's HVGs by name,
  PCA(n_components=50, svd_solver="full") fit on the reference HVG matrix (sklearn centres by
  the reference mean and does not scale; "full" = exact, as the Rust side is),
  LogisticRegression(max_iter=1000) on the reference components, predict the query.
Matrices are float32 through log1p (AnnData's dtype), float64 from PCA on.

Datasets and splits (both sides compute them exactly):
  wu2020_200.h5ad: X (raw UMI counts); labels obs `cluster_orig`; query = cells whose obs
    `patient` is in TEST_PATIENTS, reference = the rest.
  pbmc68k_reduced.h5ad: its X is scaled z-scores and raw/X is log1p of normalised counts, so the
    counts-like input is expm1(raw/X) (normalised expression; normalize_total rescales it);
    labels obs `bulk_labels`; reference = even cell index (0, 2, ...), query = odd.

Usage: python3 -m venv /tmp/skvenv && /tmp/skvenv/bin/pip install scanpy scikit-learn anndata
       /tmp/skvenv/bin/python tests/gen/eval/gen_baseline_reference.py
"""
import importlib.metadata
import json
import os

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DATA = os.path.join(ROOT, "tests", "data")
OUT = os.path.join(DATA, "eval", "baseline_reference.json")
TEST_PATIENTS = ["Endo1", "Lung2", "Renal2"]
N_HVG, N_PCS = 2000, 50


def log_normalized(x, genes):
    a = ad.AnnData(sp.csr_matrix(x, dtype=np.float32))
    a.var_names = list(genes)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def baseline(x_tr, y_tr, x_te, genes):
    assert len(set(genes)) == len(genes), "gene names must be unique to align by name"
    tr = log_normalized(x_tr, genes)
    if tr.n_vars > N_HVG:
        sc.pp.highly_variable_genes(tr, n_top_genes=N_HVG, flavor="seurat")
        hvg = list(tr.var_names[tr.var["highly_variable"].to_numpy()])
    else:
        hvg = list(tr.var_names)
    te = log_normalized(x_te, genes)
    a = np.asarray(tr[:, hvg].X.todense(), dtype=np.float64)
    b = np.asarray(te[:, hvg].X.todense(), dtype=np.float64)
    n_pcs = min(N_PCS, *a.shape)
    pca = PCA(n_components=n_pcs, svd_solver="full").fit(a)
    lr = LogisticRegression(max_iter=1000).fit(pca.transform(a), y_tr)
    return hvg, n_pcs, lr.predict(pca.transform(b)), int(lr.n_iter_[0])


def run(name, x, genes, labels, test_mask, matrix, label_col, split):
    train, test = ~test_mask, test_mask
    y_tr, y_te = labels[train], labels[test]
    hvg, n_pcs, pred, n_iter = baseline(x[train], y_tr, x[test], genes)
    return {
        "file": f"tests/data/{name}.h5ad",
        "matrix": matrix,
        "label_col": label_col,
        "split": split,
        "n_train": int(train.sum()),
        "n_test": int(test.sum()),
        "n_hvg": len(hvg),
        "n_pcs": n_pcs,
        "lr_iterations": n_iter,
        "accuracy": float(accuracy_score(y_te, pred)),
        "macro_f1": float(f1_score(y_te, pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_te, pred, average="weighted", zero_division=0)),
        "hvg": hvg,
        "test_labels": list(map(str, y_te)),
        "predictions": list(map(str, pred)),
    }


def main():
    out = {
        "generator": "tests/gen/eval/gen_baseline_reference.py",
        "versions": {p: importlib.metadata.version(p) for p in ["scanpy", "scikit-learn", "anndata", "numpy"]},
        "datasets": {},
    }
    wu = ad.read_h5ad(os.path.join(DATA, "wu2020_200.h5ad"))
    mask = wu.obs["patient"].astype(str).isin(TEST_PATIENTS).to_numpy()
    out["datasets"]["wu2020_200"] = run(
        "wu2020_200", sp.csr_matrix(wu.X), list(wu.var_names), wu.obs["cluster_orig"].astype(str).to_numpy(), mask,
        "X", "cluster_orig",
        {"rule": "query = obs `patient` in test_patients, reference = the rest", "column": "patient",
         "test_patients": TEST_PATIENTS},
    )
    pb = ad.read_h5ad(os.path.join(DATA, "pbmc68k_reduced.h5ad"))
    counts = sp.csr_matrix(pb.raw.X, dtype=np.float32)
    counts.data = np.expm1(counts.data)
    mask = (np.arange(pb.n_obs) % 2) == 1
    out["datasets"]["pbmc68k_reduced"] = run(
        "pbmc68k_reduced", counts, list(pb.raw.var_names), pb.obs["bulk_labels"].astype(str).to_numpy(), mask,
        "expm1(raw/X)", "bulk_labels",
        {"rule": "query = odd cell index, reference = even cell index"},
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for k, v in out["datasets"].items():
        print(f"{k}: train {v['n_train']} test {v['n_test']} hvg {v['n_hvg']} acc {v['accuracy']:.4f} "
              f"macro F1 {v['macro_f1']:.4f} weighted F1 {v['weighted_f1']:.4f} lr iters {v['lr_iterations']}")


if __name__ == "__main__":
    main()
