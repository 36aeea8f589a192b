#!/usr/bin/env python3
"""Generate tests/data/eval/harmony_reference.json, the truth for crates/scgpt-eval's `harmony`
module (crates/scgpt-eval/tests/harmony_reference.rs).

harmonypy 2.1.0 (`harmonypy.run_harmony` with its defaults, as scanpy's
`sc.external.pp.harmony_integrate` calls it) is run on two small inputs, each with five
`random_state`s, so that the Rust port (whose k-means initialisation draws other random numbers)
can be held to what matters, within the spread harmonypy itself shows across seeds:

  pbmc_planted  tests/data/pbmc68k_reduced.h5ad: obsm X_pca[:, :12] of the 700 PBMCs, labels
                obs `bulk_labels`; batches b0/b1 = a random half (numpy default_rng(0)), and b1
                shifted by 1.5 standard deviations per component with a random sign: a planted
                additive batch effect on real cells.
  wu2020_source tests/data/wu2020_200.h5ad: 200 T cells with a real batch effect (obs `source`:
                Tumor / NAT / Blood), labels obs `cluster_orig`; the embedding is scanpy's
                normalize_total(1e4), log1p, highly_variable_genes(n_top_genes=2000,
                flavor="seurat"), pca(n_comps=20, svd_solver="full").

Per case the JSON holds the input (embedding as float32, labels, batches), the resolved
harmonypy parameters, harmonypy's corrected embedding for random_state 0, and per seed:
  - ASW_label (scib.me.silhouette), ASW_label/batch (scib.me.silhouette_batch),
  - iLISI / cLISI: scib's graph LISI (ilisi_graph / clisi_graph, type_="embed", scaled),
  - knn_batch_mixing: mean over cells of (share of the 15 nearest other cells, euclidean,
    in another batch) / (share of all other cells in another batch); 1 = perfectly mixed,
  - batch_mean_gap: mean over labels seen in more than one batch of the largest distance
    between the label's per-batch centroids,
  - harmonypy's number of iterations and objective values,
the same metrics on the uncorrected input, and the Pearson correlation of the corrections
(Z_corr - input, all entries) of seed 0 with those of seeds 1-4: how closely harmonypy agrees
with itself when only the initialisation changes.

scib's bundled knn_graph.o needs a newer glibc than many machines have, so (as
gen_scib_reference.py does) it is rebuilt from scib's own knn_graph.cpp in a temporary folder.

Usage (about 15 s): /work/venv-sc/bin/python tests/gen/eval/gen_harmony_reference.py
"""
import importlib.metadata
import json
import os
import pathlib
import subprocess
import tempfile
import warnings

import anndata as ad
import harmonypy
import numpy as np
import pandas as pd
import scanpy as sc
import scib

warnings.filterwarnings("ignore")

ROOT = pathlib.Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
OUT = DATA / "eval" / "harmony_reference.json"
SEEDS = [0, 1, 2, 3, 4]
K_MIX = 15


def f32(a):
    """float32 values as the shortest decimal that reads back to the same float32."""
    return [float(str(np.float32(v))) for v in np.asarray(a, dtype=np.float32).ravel()]


def knn_graph_binary(tmp):
    """A copy of the scib package folder with knn_graph.o rebuilt from its source."""
    src = pathlib.Path(scib.__file__).parent / "knn_graph" / "knn_graph.cpp"
    dst = pathlib.Path(tmp) / "scib" / "knn_graph"
    dst.mkdir(parents=True)
    subprocess.run(["g++", "-O3", "-std=c++11", str(src), "-o", str(dst / "knn_graph.o")], check=True)
    return str(pathlib.Path(tmp) / "scib" / "__init__.py")


def pbmc_planted():
    pb = ad.read_h5ad(DATA / "pbmc68k_reduced.h5ad")
    rng = np.random.default_rng(0)
    emb = pb.obsm["X_pca"][:, :12].astype(np.float64)
    batches = np.where(rng.random(pb.n_obs) < 0.5, "b0", "b1")
    shift = 1.5 * emb.std(axis=0) * rng.choice([-1.0, 1.0], size=emb.shape[1])
    emb = (emb + (batches == "b1")[:, None] * shift).astype(np.float32)
    labels = pb.obs["bulk_labels"].astype(str).to_numpy()
    desc = "pbmc68k_reduced X_pca[:, :12], bulk_labels; b1 (random half) shifted by 1.5 sd per PC"
    return emb, labels, batches, desc, {"shift_b1": f32(shift)}


def wu2020_source():
    a = ad.read_h5ad(DATA / "wu2020_200.h5ad")
    a.X = a.X.astype(np.float32)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor="seurat")
    a = a[:, a.var["highly_variable"]].copy()
    sc.pp.pca(a, n_comps=20, svd_solver="full")
    emb = a.obsm["X_pca"].astype(np.float32)
    desc = "wu2020_200 counts -> normalize_total 1e4, log1p, 2000 seurat HVGs, PCA 20; batch = source"
    return emb, a.obs["cluster_orig"].astype(str).to_numpy(), a.obs["source"].astype(str).to_numpy(), desc, {}


def knn_batch_mixing(emb, batches):
    x = emb.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1, kind="stable")[:, :K_MIX]
    n = len(batches)
    _, inv, counts = np.unique(batches, return_inverse=True, return_counts=True)
    other = (batches[nn] != batches[:, None]).mean(axis=1)
    expected = (n - counts[inv]) / (n - 1)
    return float(np.mean(other / expected))


def batch_mean_gap(emb, labels, batches):
    gaps = []
    for l in np.unique(labels):
        m = labels == l
        bs = [b for b in np.unique(batches[m]) if (m & (batches == b)).sum() > 0]
        if len(bs) < 2:
            continue
        cents = np.array([emb[m & (batches == b)].astype(np.float64).mean(axis=0) for b in bs])
        gaps.append(max(np.linalg.norm(cents[i] - cents[j]) for i in range(len(bs)) for j in range(i + 1, len(bs))))
    return float(np.mean(gaps))


def metrics(emb, labels, batches):
    a = ad.AnnData(X=np.zeros((len(labels), 1), dtype=np.float32),
                   obs=pd.DataFrame({"label": pd.Categorical(labels), "batch": pd.Categorical(batches)}))
    a.obsm["E"] = np.asarray(emb, dtype=np.float32)
    return {
        "ASW_label": float(scib.me.silhouette(a, label_key="label", embed="E")),
        "ASW_label/batch": float(scib.me.silhouette_batch(a, batch_key="batch", label_key="label", embed="E", verbose=False)),
        "iLISI": float(scib.me.ilisi_graph(a.copy(), batch_key="batch", type_="embed", use_rep="E", scale=True)),
        "cLISI": float(scib.me.clisi_graph(a.copy(), label_key="label", type_="embed", use_rep="E", scale=True)),
        "knn_batch_mixing": knn_batch_mixing(np.asarray(emb, dtype=np.float32), batches),
        "batch_mean_gap": batch_mean_gap(np.asarray(emb, dtype=np.float32), labels, batches),
    }


def run_case(name, build):
    emb, labels, batches, desc, extra = build()
    n = emb.shape[0]
    meta = pd.DataFrame({"batch": batches})
    runs = []
    z0 = None
    corr = []
    for s in SEEDS:
        # ncores=1: harmonypy's result does not depend on it, but one thread is the simplest.
        h = harmonypy.run_harmony(emb, meta, "batch", random_state=s, verbose=False, ncores=1)
        z = np.asarray(h.Z_corr, dtype=np.float64)
        assert z.shape == emb.shape, z.shape
        if z0 is None:
            z0 = z
        else:
            corr.append(float(np.corrcoef((z0 - emb).ravel(), (z - emb).ravel())[0, 1]))
        runs.append({
            "random_state": s,
            "n_iterations": len(h.objective_harmony) - 1,
            "objective_harmony": [float(v) for v in h.objective_harmony],
            "metrics": metrics(z, labels, batches),
        })
    case = {
        "name": name,
        "description": desc,
        "n_cells": int(n),
        "dims": int(emb.shape[1]),
        "inputs": {"embedding": f32(emb), "labels": labels.tolist(), "batches": batches.tolist(), **extra},
        "harmonypy_params": {
            "theta": 2.0, "lamb": None, "alpha": 0.2, "sigma": 0.1, "nclust": int(min(round(n / 30.0), 100)),
            "max_iter_harmony": 10, "max_iter_kmeans": 4, "epsilon_cluster": 1e-3, "epsilon_harmony": 1e-2,
            "block_size": 0.05, "batch_prop_cutoff": 1e-5,
        },
        "uncorrected": metrics(emb, labels, batches),
        "harmonypy_z_corr_seed0": f32(z0),
        "correction_correlation_seed0_vs_seeds_1_4": corr,
        "harmonypy_runs": runs,
    }
    print(f"{name}: uncorrected {case['uncorrected']}")
    for r in runs:
        print(f"  seed {r['random_state']}: {r['n_iterations']} iterations {r['metrics']}")
    return case


def main():
    with tempfile.TemporaryDirectory() as tmp:
        real_file = scib.__file__
        scib.__file__ = knn_graph_binary(tmp)
        try:
            cases = [run_case("pbmc_planted", pbmc_planted), run_case("wu2020_source", wu2020_source)]
        finally:
            scib.__file__ = real_file
    out = {
        "generator": "tests/gen/eval/gen_harmony_reference.py",
        "versions": {p: importlib.metadata.version(p) for p in
                     ["harmonypy", "scib", "scanpy", "scikit-learn", "anndata", "numpy"]},
        "knn_batch_mixing_k": K_MIX,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
