#!/usr/bin/env python3
"""Generate the scIB integration-metric fixtures, the truth for crates/scgpt-eval's `neighbors`,
`leiden`, `scib`, `pcr` and `lisi` modules and for `scgpt eval integration`:

  tests/data/eval/scib_reference.json  inputs (embedding, labels, batches, a fixed clustering, the
                                       sparse pre-integration matrix) and every reference value
  tests/data/eval/scib_small.h5ad      the same cells as an h5ad (X = the pre matrix, obsm X_emb,
                                       obs label / batch / louvain, plus single_batch and
                                       batch_with_missing for input checks, and a stored PCA)
                                       for the CLI test

Data: tests/data/pbmc68k_reduced.h5ad (700 PBMCs, scanpy's bundled file).
  - label = obs `bulk_labels` (10 types), except that one Dendritic cell is relabelled
    "Lone cell" (a one-cell label);
  - batch = b0/b1/b2 drawn with numpy's default_rng(0), except that every
    "CD4+/CD45RA+/CD25- Naive T" cell is put in b0 (a label seen in one batch only, which
    scib's silhouette_batch skips);
  - embedding X_emb = obsm X_pca[:, :16] + a per-batch shift (float32): a planted batch effect;
  - pre matrix X = raw/X (log1p-normalised) on the 60 genes of highest variance, with the
    stored values of b1 scaled by 1.8 and of b2 by 0.5 (float32 CSR): the "unintegrated" data;
  - fixed clustering = obs `louvain` (11 clusters), for NMI/ARI on a clustering both sides share.

Reference values (scib 1.1.7 with scanpy 1.11.5, exact versions are written into the JSON):
  - sc.pp.neighbors(use_rep="X_emb") (15 neighbours; n < 8192, so scanpy's exact sklearn
    brute-force kNN): kNN indices/distances and the full UMAP connectivities;
  - scib.me.silhouette, silhouette_batch, nmi, ari, graph_connectivity, pcr (both sides),
    pcr_comparison;
  - scib's graph LISI: per-cell lisi_graph_py values and ilisi_graph/clisi_graph (type_="knn",
    no subsampling). scib's bundled knn_graph.o needs a newer glibc than many machines have, so
    it is rebuilt here from scib's own knn_graph.cpp (g++ -O3 -std=c++11, as scib's makefile)
    into a temporary copy that scib is pointed at;
  - sc.tl.leiden (flavor leidenalg, seed 0, n_iterations -1) at scib's 10 resolutions, with the
    partition's modularity at that resolution (igraph, undirected, weighted);
  - scib.me.cluster_optimal_resolution and the full scib.metrics.metrics(...) call that the
    benchmark times;
  - PCR with an existing PCA (sc.pp.pca(n_comps=20) on X), which scib uses for adata_pre as is;
    the h5ad keeps it as obsm X_pca_stored + uns/pca_stored/variance.

Usage: /work/venv-sc/bin/python tests/gen/eval/gen_scib_reference.py
"""
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings

import anndata as ad
import igraph as ig
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import scib
from scib.metrics.lisi import lisi_graph_py
from sklearn.metrics import adjusted_rand_score, silhouette_samples

warnings.filterwarnings("ignore")

ROOT = pathlib.Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
OUT_JSON = DATA / "eval" / "scib_reference.json"
OUT_H5AD = DATA / "eval" / "scib_small.h5ad"
EMB_DIMS = 16
N_GENES = 60
N_DIST_ROWS = 100  # kNN distances are kept for these first cells only (file size)
ONE_BATCH_LABEL = "CD4+/CD45RA+/CD25- Naive T"
RESOLUTIONS = scib.metrics.clustering.get_resolutions(n=10, max=2)


def f32(a):
    """float32 values as the shortest decimal that reads back to the same float32."""
    return [float(str(np.float32(v))) if np.isfinite(v) else None for v in np.asarray(a, dtype=np.float32).ravel()]


def build():
    pb = ad.read_h5ad(DATA / "pbmc68k_reduced.h5ad")
    n = pb.n_obs
    rng = np.random.default_rng(0)
    labels = pb.obs["bulk_labels"].astype(str).to_numpy().copy()
    lone = int(np.flatnonzero(labels == "Dendritic")[0])
    labels[lone] = "Lone cell"
    batches = rng.choice(np.array(["b0", "b1", "b2"]), size=n, p=[0.4, 0.35, 0.25])
    batches[labels == ONE_BATCH_LABEL] = "b0"
    shift = rng.normal(0.0, 0.6, size=(3, EMB_DIMS))
    bidx = np.array([int(b[1]) for b in batches])
    emb = (pb.obsm["X_pca"][:, :EMB_DIMS].astype(np.float64) + shift[bidx]).astype(np.float32)

    raw = sp.csr_matrix(pb.raw.X, dtype=np.float32)
    dense = raw.toarray()
    genes = np.sort(np.argsort(-dense.var(axis=0), kind="stable")[:N_GENES])
    x = sp.csr_matrix(dense[:, genes])
    x.sort_indices()
    scale = np.array([1.0, 1.8, 0.5], dtype=np.float32)[bidx]
    x = sp.csr_matrix(sp.diags(scale) @ x, dtype=np.float32)
    x.sort_indices()

    obs = pd.DataFrame(
        {
            "label": pd.Categorical(labels),
            "batch": pd.Categorical(batches),
            "louvain": pd.Categorical(pb.obs["louvain"].astype(str).to_numpy()),
        },
        index=pb.obs_names.astype(str),
    )
    var = pd.DataFrame(index=np.asarray(pb.raw.var_names)[genes].astype(str))
    a = ad.AnnData(X=x, obs=obs, var=var)
    a.obsm["X_emb"] = emb
    return a, lone, shift


def knn_graph_binary(tmp):
    """A copy of the scib package folder with knn_graph.o rebuilt from its source."""
    src = pathlib.Path(scib.__file__).parent / "knn_graph" / "knn_graph.cpp"
    dst = pathlib.Path(tmp) / "scib" / "knn_graph"
    dst.mkdir(parents=True)
    subprocess.run(["g++", "-O3", "-std=c++11", str(src), "-o", str(dst / "knn_graph.o")], check=True)
    return str(pathlib.Path(tmp) / "scib" / "__init__.py")


def csr_json(m):
    m = sp.csr_matrix(m)
    m.sort_indices()
    return {"indptr": m.indptr.tolist(), "indices": m.indices.tolist(), "data": f32(m.data)}


def main():
    a, lone, shift = build()
    out = {
        "generator": "tests/gen/eval/gen_scib_reference.py",
        "versions": {p: importlib.metadata.version(p) for p in
                     ["scib", "scanpy", "scikit-learn", "leidenalg", "igraph", "umap-learn", "anndata", "numpy", "scipy"]},
        "n_cells": int(a.n_obs),
        "emb_dims": EMB_DIMS,
        "lone_cell_index": lone,
        "inputs": {
            "labels": a.obs["label"].astype(str).tolist(),
            "batches": a.obs["batch"].astype(str).tolist(),
            "louvain": a.obs["louvain"].astype(str).tolist(),
            "embedding": f32(a.obsm["X_emb"]),
            "pre": dict(csr_json(a.X), n_cols=int(a.n_vars)),
        },
    }
    ref = {}

    # kNN graph and connectivities, as every graph metric of scib uses them.
    g = a.copy()
    sc.pp.neighbors(g, use_rep="X_emb")
    d = g.obsp["distances"].tocsr()
    knn_idx, knn_dist = [], []
    for i in range(g.n_obs):
        row = d[i]
        order = np.argsort(row.data, kind="stable")
        knn_idx.append(row.indices[order].tolist())
        if i < N_DIST_ROWS:
            knn_dist.append(f32(row.data[order]))
    ref["neighbors"] = {
        "n_neighbors": int(g.uns["neighbors"]["params"]["n_neighbors"]),
        "knn_indices": knn_idx,
        "knn_distances_first_rows": knn_dist,
        "connectivities": csr_json(g.obsp["connectivities"]),
    }

    # Exact metrics on the embedding and on the fixed clustering.
    emb = g.obsm["X_emb"]
    ref["ASW_label"] = float(scib.me.silhouette(g, label_key="label", embed="X_emb"))
    ref["silhouette_samples_label"] = silhouette_samples(emb, g.obs["label"]).tolist()
    asw_b, means, _ = scib.me.silhouette_batch(g, batch_key="batch", label_key="label", embed="X_emb",
                                                return_all=True, verbose=False)
    ref["ASW_label/batch"] = float(asw_b)
    ref["ASW_label/batch_per_label"] = {str(k): float(v) for k, v in means["silhouette_score"].items()}
    ref["fixed_clustering"] = {
        "NMI": float(scib.me.nmi(g, cluster_key="louvain", label_key="label")),
        "ARI": float(scib.me.ari(g, cluster_key="louvain", label_key="label")),
        "ARI_sklearn": float(adjusted_rand_score(g.obs["louvain"], g.obs["label"])),
    }
    ref["graph_conn"] = float(scib.me.graph_connectivity(g, label_key="label"))
    p_post = float(scib.me.pcr(g, covariate="batch", embed="X_emb", linreg_method="numpy"))
    p_pre = float(scib.me.pcr(g, covariate="batch", embed=None, recompute_pca=True, linreg_method="numpy"))
    ref["pcr"] = {
        "P_post_embedding": p_post,
        "P_pre_X": p_pre,
        "PCR_batch": float(scib.me.pcr_comparison(g, g, covariate="batch", embed="X_emb")),
    }

    # Graph LISI on the same kNN graph (type_="knn": scib reuses uns["neighbors"]).
    with tempfile.TemporaryDirectory() as tmp:
        real_file = scib.__file__
        scib.__file__ = knn_graph_binary(tmp)
        try:
            lisi_b = lisi_graph_py(g.copy(), obs_key="batch", n_neighbors=90)
            lisi_l = lisi_graph_py(g.copy(), obs_key="label", n_neighbors=90)
            ilisi = scib.me.ilisi_graph(g.copy(), batch_key="batch", type_="knn", scale=True)
            clisi = scib.me.clisi_graph(g.copy(), label_key="label", type_="knn", scale=True)
        finally:
            scib.__file__ = real_file
    ref["lisi"] = {
        "k0": 90,
        "perplexity": 30,
        "per_cell_batch": [float(v) for v in lisi_b],
        "per_cell_label": [float(v) for v in lisi_l],
        "iLISI": float(ilisi),
        "cLISI": float(clisi),
    }

    # Leiden at scib's resolutions on this graph, and the quality of each partition.
    conn = sp.csr_matrix(g.obsp["connectivities"])
    up = sp.triu(conn, k=1).tocoo()
    graph = ig.Graph(n=g.n_obs, edges=list(zip(up.row.tolist(), up.col.tolist())), directed=False)
    weights = up.data.astype(np.float64)
    leiden = []
    for r in RESOLUTIONS:
        key = f"leiden_{r}"
        sc.tl.leiden(g, resolution=r, key_added=key)
        memb = g.obs[key].astype(int).to_numpy()
        leiden.append({
            "resolution": r,
            "n_clusters": int(len(np.unique(memb))),
            "modularity": float(graph.modularity(memb.tolist(), weights=weights, resolution=r, directed=False)),
            "NMI": float(scib.me.nmi(g, cluster_key=key, label_key="label")),
            "ARI": float(scib.me.ari(g, cluster_key=key, label_key="label")),
        })
    ref["leiden"] = leiden
    opt = g.copy()
    res_max, nmi_max, _ = scib.me.cluster_optimal_resolution(
        opt, label_key="label", cluster_key="cluster", use_rep="X_emb", return_all=True, verbose=False)
    ref["optimal_clustering"] = {
        "resolutions": RESOLUTIONS,
        "resolution": float(res_max),
        "NMI": float(nmi_max),
        "ARI": float(scib.me.ari(opt, cluster_key="cluster", label_key="label")),
    }

    # scib's other P_pre path: adata_pre with obsm["X_pca"] and uns["pca"] uses that PCA as is.
    # Stored in the h5ad under other names (X_pca_stored, uns/pca_stored) so the default path
    # of the CLI test stays X; the CLI test renames them before its run.
    withpca = a.copy()
    sc.pp.pca(withpca, n_comps=20)
    ref["pcr_existing_pca"] = {
        "n_comps": 20,
        "P_pre": float(scib.me.pcr(withpca, covariate="batch", embed=None, linreg_method="numpy")),
        "PCR_batch": float(scib.me.pcr_comparison(withpca, withpca, covariate="batch", embed="X_emb")),
    }
    stored_pca = withpca.obsm["X_pca"].astype(np.float32)
    stored_var = np.asarray(withpca.uns["pca"]["variance"], dtype=np.float64)

    # The call the benchmark times (scib.metrics.metrics as the scGPT tutorial makes it).
    full = a.copy()
    m = scib.metrics.metrics(
        full, full, "batch", "label", embed="X_emb", isolated_labels_asw_=False, silhouette_=True,
        hvg_score_=False, graph_conn_=True, pcr_=True, isolated_labels_f1_=False, trajectory_=False,
        nmi_=True, ari_=True, cell_cycle_=False, kBET_=False, ilisi_=False, clisi_=False)
    ref["metrics"] = {k: (None if pd.isna(v) else float(v)) for k, v in m[0].items()}

    out["reference"] = ref
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT_JSON, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    # The h5ad read by the CLI test; a temp name + rename so a failed run leaves no half file.
    # Two extra obs columns for its input checks: one batch value for every cell, and the batch
    # with a missing value (NaN in the categorical, code -1 on disk) for the first 5 cells.
    a.obs["single_batch"] = pd.Categorical(["all"] * a.n_obs)
    gappy = a.obs["batch"].astype(object).to_numpy().copy()
    gappy[:5] = np.nan
    a.obs["batch_with_missing"] = pd.Categorical(gappy)
    a.obsm["X_pca_stored"] = stored_pca
    a.uns["pca_stored"] = {"variance": stored_var}
    tmp = OUT_H5AD.with_suffix(".tmp.h5ad")
    a.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, OUT_H5AD)

    print(f"wrote {OUT_JSON} ({OUT_JSON.stat().st_size} bytes), {OUT_H5AD} ({OUT_H5AD.stat().st_size} bytes)")
    for k in ["ASW_label", "ASW_label/batch", "graph_conn"]:
        print(f"  {k}: {ref[k]:.6f}")
    print(f"  fixed clustering: {ref['fixed_clustering']}")
    print(f"  pcr: {ref['pcr']}")
    print(f"  iLISI {ref['lisi']['iLISI']:.6f} cLISI {ref['lisi']['cLISI']:.6f}")
    for l in leiden:
        print(f"  leiden r={l['resolution']}: {l['n_clusters']} clusters, Q={l['modularity']:.6f}, NMI {l['NMI']:.4f}")
    print(f"  optimal: {ref['optimal_clustering']}")
    print(f"  metrics: {ref['metrics']}")


if __name__ == "__main__":
    sys.exit(main())
