#!/usr/bin/env python3
"""Generate tests/data/eval/hvg_reference.json: scanpy's gene filtering and highly-variable-gene
selection on the bundled real data, the truth for crates/scgpt-eval's `preprocess` module
(`filter_genes_min_counts`, `highly_variable_genes`); the test is
crates/scgpt-cli/tests/hvg_reference.rs (it reads the same h5ad files).

Cases (HVG_CASES below): wu2020_200 X (raw UMI counts) and pbmc68k_reduced raw/X (log1p of
normalised expression, 765 genes), optionally prepared in scGPT's Preprocessor order
(filter_genes(min_counts=k), normalize_total(target_sum=1e4), log1p), then
highly_variable_genes(n_top_genes=n, flavor=..., batch_key=...) on X as prepared:
  - seurat_v3 on counts (filtered, as scGPT's Preprocessor leaves X), with and without a batch;
    the batch is obs `source` folded into Tumor vs the rest (95 / 105 cells): scanpy's LOESS
    fails on the 20 Blood cells alone.
  - cell_ranger and seurat on filtered, normalised, log1p data, with and without batch `source`
    (and `patient`, 14 batches of 2 to 32 cells, for seurat); cell_ranger on pbmc68k raw/X with
    and without batch `phase`.
  - cases where scanpy itself raises (`error`): seurat_v3 on unfiltered genes or with too small
    batches (scikit-misc's loess refuses a local fit needing a pseudoinverse), cell_ranger per
    patient (pandas refuses duplicate percentile bin edges). The port must fail there too.
Plus filter_min_counts3: sc.pp.filter_genes(min_counts=3) on wu2020 X, as a packed bit mask.

Per HVG case the file holds the selected gene names (in var order), and for a few probe genes
(evenly spaced over all genes, over the selected ones, and the genes just inside and just outside
the cut in scanpy's final order) every diagnostic column scanpy writes. `cut` gives the sort
keys of the last gene taken and the first gene left out, so a test can see how close the call is.

seurat_v3 ranks genes with numpy's default (unstable) argsort, so genes with exactly equal
normalised variance (same UMI pattern; common among rare genes) are ordered by whatever numpy's
sort kernel does on the machine. For seurat_v3 `selected_numpy_ties` is scanpy's plain result and
`selected` (and the diagnostics) come from scanpy rerun with every np.argsort forced stable, i.e.
ties in gene order, the rule the Rust port uses.

NUMBA_NUM_THREADS=1 is set before scanpy is imported: scanpy's per-gene mean/variance
(`sparse_mean_var_minor_axis`) sums the cells in per-thread strides, so on non-integer data the
last bits of its sums depend on the machine's thread count. One thread gives the plain
cell-order sums the Rust port computes. (Integer counts sum exactly either way.)

Usage: /work/venv-sc/bin/python tests/gen/eval/gen_hvg_reference.py
       (needs scanpy, anndata, scikit-misc, statsmodels)
"""
import os

os.environ["NUMBA_NUM_THREADS"] = "1"

import importlib.metadata  # noqa: E402
import json  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import scanpy as sc  # noqa: E402
import scipy.sparse as sp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DATA = os.path.join(ROOT, "tests", "data")
OUT = os.path.join(DATA, "eval", "hvg_reference.json")
N_PROBE = 8  # per probe group


def load(spec):
    """The AnnData a case starts from: `file`'s X or raw/X as float32 CSR, then the optional
    preparation steps in scGPT's Preprocessor order, then the batch column."""
    a = ad.read_h5ad(os.path.join(ROOT, spec["file"]))
    if spec["matrix"] == "raw/X":
        b = ad.AnnData(sp.csr_matrix(a.raw.X, dtype=np.float32), obs=a.obs.copy())
        b.var_names = list(a.raw.var_names)
        a = b
    else:
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
    if spec.get("filter_min_counts") is not None:
        sc.pp.filter_genes(a, min_counts=spec["filter_min_counts"])
    if spec.get("normalize_total") is not None:
        sc.pp.normalize_total(a, target_sum=spec["normalize_total"])
    if spec.get("log1p"):
        sc.pp.log1p(a)
    batch = spec.get("batch")
    if batch is not None:
        col = a.obs[batch["obs"]].astype(str)
        if batch.get("map"):
            col = col.map(batch["map"])
        a.obs["_batch"] = col.to_numpy()
    return a


def stable_argsort_hvg(adata, kw):
    original = np.argsort

    def stable(a, axis=-1, kind=None, order=None, **more):
        return original(a, axis=axis, kind="stable", order=order, **more)

    np.argsort = stable
    try:
        return sc.pp.highly_variable_genes(adata, **kw)
    finally:
        np.argsort = original


def number(v):
    v = float(v)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def final_order(df, flavor, batched):
    """Gene positions in the order scanpy ranks them when it takes the top n."""
    idx = np.arange(len(df))
    if flavor == "seurat_v3":
        # sort_values(["highly_variable_rank", "highly_variable_nbatches"], [True, False],
        # na_position="last"): a stable lexsort.
        rank = df["highly_variable_rank"].to_numpy(dtype=np.float64)
        nb = df["highly_variable_nbatches"].to_numpy(dtype=np.float64) if batched else np.zeros(len(df))
        key_rank = np.where(np.isnan(rank), np.inf, rank)
        # genes without a rank come last in gene order; listing them by normalised variance
        # instead changes nothing about the choice and makes `cut.first_out` the runner-up
        vn = df["variances_norm"].to_numpy(dtype=np.float64)
        tail = np.where(np.isnan(rank), -vn, 0.0)
        return idx[np.lexsort((idx, tail, -nb, key_rank))]
    disp = df["dispersions_norm"].to_numpy(dtype=np.float64)
    if batched:
        # sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False), ties in
        # the order of the groupby index (gene names sorted)
        nb = df["highly_variable_nbatches"].to_numpy(dtype=np.float64)
        names = np.array(df.index, dtype=object)
        name_rank = np.empty(len(df), dtype=np.int64)
        name_rank[np.argsort(names, kind="stable")] = np.arange(len(df))
        key_disp = np.where(np.isnan(disp), np.inf, -disp)
        return idx[np.lexsort((name_rank, key_disp, -nb))]
    key_disp = np.where(np.isnan(disp), np.inf, -disp)
    return idx[np.lexsort((idx, key_disp))]


def hvg_case(spec):
    adata = load(spec)
    flavor, n_top = spec["flavor"], spec["n_top_genes"]
    batched = spec.get("batch") is not None
    kw = dict(n_top_genes=n_top, flavor=flavor, inplace=False)
    if batched:
        kw["batch_key"] = "_batch"
    out = dict(spec, n_cells=int(adata.n_obs), n_genes=int(adata.n_vars))
    try:
        df = sc.pp.highly_variable_genes(adata, **kw)
    except ValueError as e:
        # scanpy itself fails (skmisc's loess refuses a singular local fit, or pandas refuses
        # duplicate bin edges); the port must fail too.
        out["error"] = str(e)[:200]
        return out
    if flavor == "seurat_v3":
        # numpy's default argsort is not stable, so genes with exactly equal normalised variance
        # (common: same UMI pattern) get ranks in an order only numpy's sort kernel knows. Keep
        # scanpy's plain choice, then rerun scanpy with every np.argsort made stable (ties in gene
        # order, which the Rust port uses); diagnostics come from that run.
        out["selected_numpy_ties"] = [adata.var_names[i] for i in np.flatnonzero(df["highly_variable"].to_numpy())]
        df = stable_argsort_hvg(adata, kw)
    names = list(adata.var_names)
    assert list(df.index) == names
    hv = df["highly_variable"].to_numpy(dtype=bool)
    order = final_order(df, flavor, batched)
    n_sel = int(hv.sum())
    # scanpy's own flags must agree with the order reconstructed here (checks final_order)
    assert set(order[:n_sel].tolist()) == set(np.flatnonzero(hv).tolist()), "order reconstruction"

    cols = [c for c in ["means", "variances", "variances_norm", "highly_variable_rank", "dispersions",
                        "dispersions_norm", "highly_variable_nbatches"] if c in df.columns]
    sel = np.flatnonzero(hv)
    g = len(names)
    probe = sorted(set(
        np.linspace(0, g - 1, N_PROBE).astype(int).tolist()
        + sel[np.linspace(0, len(sel) - 1, N_PROBE).astype(int)].tolist()
        + order[max(0, n_sel - N_PROBE // 2): n_sel + N_PROBE // 2].tolist()
    ))
    out["n_selected"] = n_sel
    out["selected"] = [names[i] for i in sel]
    out["probe"] = {"genes": [names[i] for i in probe]}
    for c in cols:
        out["probe"][c] = [number(df[c].iloc[i]) for i in probe]
    if n_sel < g:
        last, first_out = order[n_sel - 1], order[n_sel]
        keys = ["highly_variable_rank", "highly_variable_nbatches", "variances_norm"] if flavor == "seurat_v3" \
            else ["highly_variable_nbatches", "dispersions_norm"]
        keys = [k for k in keys if k in df.columns]
        out["cut"] = {
            "last_in": {"gene": names[last], **{k: number(df[k].iloc[last]) for k in keys}},
            "first_out": {"gene": names[first_out], **{k: number(df[k].iloc[first_out]) for k in keys}},
        }
    return out


WU = "tests/data/wu2020_200.h5ad"
PBMC = "tests/data/pbmc68k_reduced.h5ad"
LOGNORM = dict(filter_min_counts=3, normalize_total=1e4, log1p=True)
TUMOR = {"obs": "source", "map": {"Tumor": "Tumor", "NAT": "Other", "Blood": "Other"}}
HVG_CASES = {
    # scGPT's Preprocessor order: filter genes, then seurat_v3 on the raw counts in X
    "seurat_v3_500": dict(file=WU, matrix="X", filter_min_counts=3, flavor="seurat_v3", n_top_genes=500),
    "seurat_v3_500_tumor": dict(file=WU, matrix="X", filter_min_counts=5, flavor="seurat_v3", n_top_genes=500,
                                batch=TUMOR),
    "cell_ranger_500": dict(file=WU, matrix="X", **LOGNORM, flavor="cell_ranger", n_top_genes=500),
    "cell_ranger_500_source": dict(file=WU, matrix="X", **LOGNORM, flavor="cell_ranger", n_top_genes=500,
                                   batch={"obs": "source"}),
    "seurat_500": dict(file=WU, matrix="X", **LOGNORM, flavor="seurat", n_top_genes=500),
    "seurat_500_source": dict(file=WU, matrix="X", **LOGNORM, flavor="seurat", n_top_genes=500,
                              batch={"obs": "source"}),
    "seurat_500_patient": dict(file=WU, matrix="X", **LOGNORM, flavor="seurat", n_top_genes=500,
                               batch={"obs": "patient"}),
    "cell_ranger_200_pbmc": dict(file=PBMC, matrix="raw/X", flavor="cell_ranger", n_top_genes=200),
    "cell_ranger_200_pbmc_phase": dict(file=PBMC, matrix="raw/X", flavor="cell_ranger", n_top_genes=200,
                                       batch={"obs": "phase"}),
    # where scanpy fails, the port must fail too
    "seurat_v3_500_unfiltered": dict(file=WU, matrix="X", flavor="seurat_v3", n_top_genes=500),
    "seurat_v3_500_tumor_min3": dict(file=WU, matrix="X", filter_min_counts=3, flavor="seurat_v3",
                                     n_top_genes=500, batch=TUMOR),
    "seurat_v3_500_source": dict(file=WU, matrix="X", filter_min_counts=10, flavor="seurat_v3",
                                 n_top_genes=500, batch={"obs": "source"}),
    "cell_ranger_500_patient": dict(file=WU, matrix="X", **LOGNORM, flavor="cell_ranger", n_top_genes=500,
                                    batch={"obs": "patient"}),
}


def main():
    versions = {p: importlib.metadata.version(p)
                for p in ["scanpy", "anndata", "numpy", "scipy", "pandas", "scikit-misc", "statsmodels", "numba"]}
    cases = {}

    wu = load(dict(file=WU, matrix="X"))
    keep, number_per_gene = sc.pp.filter_genes(wu.X, min_counts=3, inplace=False)
    bits = np.packbits(keep.astype(np.uint8), bitorder="little")
    cases["filter_min_counts3"] = {
        "file": WU,
        "matrix": "X",
        "min_counts": 3,
        "n_genes": int(wu.n_vars),
        "n_kept": int(keep.sum()),
        "kept_mask_hex": bits.tobytes().hex(),
        "mask_encoding": "numpy.packbits(kept, bitorder='little'): bit (i % 8) of byte i // 8 is gene i",
        "probe_number_per_gene": {
            "genes": [wu.var_names[i] for i in range(0, wu.n_vars, 3000)],
            "counts": [float(number_per_gene[i]) for i in range(0, wu.n_vars, 3000)],
        },
    }
    for name, spec in HVG_CASES.items():
        cases[name] = hvg_case(spec)
    out = {
        "generator": "tests/gen/eval/gen_hvg_reference.py",
        "versions": versions,
        "numba_num_threads": 1,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for k, v in cases.items():
        print(k, v.get("n_kept"), v.get("n_genes"), v.get("n_selected"), v.get("error", ""), v.get("cut", ""))


if __name__ == "__main__":
    main()
