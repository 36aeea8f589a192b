#!/usr/bin/env python3
"""The original's data-prep path, timed, for the scgpt-prep benchmark.

What the original corpus build does per h5ad partition (spec §3.4): scanpy's gene filter
(min_counts = 3/10000 per cell), scBank-style conversion (each cell's nonzero in-vocabulary genes as
vocab ids + raw values, zero rows removed), and the original's `binning` (scgpt 0.2.4,
imported from the installed package) on each cell's values; written as a zstd Parquet table. It is
single-threaded, as the original. Prints one JSON line with cells, seconds, cells/s, peak RSS.

usage: prep_python_reference.py --h5ad F --cells N --gene-col feature_name --out DIR
"""
import argparse
import gzip
import json
import os
import resource
import sys
import time

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scanpy as sc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gen"))
from gen_binning_reference import load_original_binning  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True)
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--gene-col", default="feature_name")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    binning, _ = load_original_binning()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    vocab = json.load(gzip.open(os.path.join(root, "data", "vocab_human.json.gz"), "rt"))

    t0 = time.perf_counter()
    backed = ad.read_h5ad(a.h5ad, backed="r")
    adata = backed[: a.cells].to_memory()
    t_read = time.perf_counter() - t0
    sc.pp.filter_genes(adata, min_counts=3 / 10000 * adata.n_obs)
    names = adata.var[a.gene_col].astype(str).values if a.gene_col else adata.var_names.values
    in_vocab = np.array([n in vocab for n in names])
    adata = adata[:, in_vocab]
    ids = np.array([vocab[n] for n in names[in_vocab]], dtype=np.int64)
    X = adata.X.tocsr()
    genes, exprs, bins = [], [], []
    for i in range(X.shape[0]):
        s, e = X.indptr[i], X.indptr[i + 1]
        if e == s:
            continue  # scBank removes zero rows
        vals = X.data[s:e]
        genes.append(ids[X.indices[s:e]])
        exprs.append(vals.astype(np.float32))
        bins.append(binning(vals, n_bins=51).astype(np.uint8))
    table = pa.table({"genes": genes, "expressions": exprs, "bins": bins})
    os.makedirs(a.out, exist_ok=True)
    pq.write_table(table, os.path.join(a.out, "reference.parquet"), compression="zstd")
    secs = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cells": len(genes), "seconds": round(secs, 2), "read_seconds": round(t_read, 2),
                      "cells_per_s": round(len(genes) / secs, 1), "peak_rss_mb": round(peak_mb)}))


if __name__ == "__main__":
    main()
