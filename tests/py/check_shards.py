#!/usr/bin/env python3
"""Independent check of scgpt-prep output against the source h5ad files.

Reads each h5ad with anndata (counts from raw/X when present, else X), applies the documented
rules (vocabulary match incl. Ensembl->symbol, per-file gene filter, min genes per cell, obs
filters, float-noise rounding), reads the shards with pyarrow, and compares every cell. Bins are
checked against numpy's own quantile/digitize: inside the original's tie range always, and equal
to its lowest bin under --deterministic. Exits non-zero with a message on the first mismatch.
"""
import argparse
import gzip
import json
import os
import sys

import anndata as ad
import blake3
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

SPECIALS = {"<pad>", "<cls>", "<eoc>"}


def fail(msg):
    print(f"MISMATCH: {msg}", file=sys.stderr)
    sys.exit(1)


def ensembl_table(root):
    table = {}
    with gzip.open(os.path.join(root, "data", "ensembl_to_symbol.tsv.gz"), "rt") as f:
        next(f)
        for line in f:
            eid, sym = line.rstrip("\n").split("\t")
            table[eid] = sym
    return table


def gene_names(adata, gene_col):
    if adata.raw is not None:
        names = list(adata.raw.var_names)
        if gene_col:
            if gene_col in adata.raw.var.columns:
                return list(adata.raw.var[gene_col].astype(str))
            lookup = dict(zip(adata.var_names, adata.var[gene_col].astype(str)))
            return [lookup.get(n, "") for n in names]
        return names
    if gene_col:
        return list(adata.var[gene_col].astype(str))
    return list(adata.var_names)


def vocab_ids(names, vocab, ens):
    ids = []
    for n in names:
        if n in vocab and n not in SPECIALS:
            ids.append(vocab[n])
        elif n.startswith("ENS") and ens.get(n.split(".")[0]) in vocab and ens.get(n.split(".")[0]) not in SPECIALS:
            ids.append(vocab[ens[n.split(".")[0]]])
        else:
            ids.append(None)
    return ids


def bin_range(values, n_bins):
    x = np.asarray(values, dtype=np.float32)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    lo = np.where(left > right, right + 1, left)
    return lo, left


def keeps(filt, value):
    text = filt.strip()
    for op in ("==", "!="):
        if op in text:
            col, rhs = text.split(op, 1)
            v = json.loads(rhs.strip())
            return col.strip(), (lambda s, v=v, op=op: (s == v) if op == "==" else (s != v))
    neg = " not in " in text
    col, rhs = text.split(" not in " if neg else " in ", 1)
    vals = set(json.loads(rhs.strip()))
    return col.strip(), (lambda s: (s in vals) != neg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", action="append", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--gene-col", default="")
    p.add_argument("--min-genes", type=int, default=1)
    p.add_argument("--per10k", type=float, default=3.0)
    p.add_argument("--obs-filter", action="append", default=[])
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--allow-non-integer", action="store_true")
    p.add_argument("--n-bins", type=int, default=51)
    a = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    manifest = json.load(open(os.path.join(a.shards, "manifest.json")))
    vocab = json.load(open(os.path.join(a.shards, "vocab.json")))
    ens = ensembl_table(root)
    obs_cols = manifest["obs_cols"]
    for s in manifest["shards"]:
        path = os.path.join(a.shards, s["file"])
        digest = blake3.blake3(open(path, "rb").read()).hexdigest()
        if digest != s["blake3"] or os.path.getsize(path) != s["bytes"]:
            fail(f"{s['file']}: checksum or size differs from the manifest")
        if pq.ParquetFile(path).metadata.num_rows != s["rows"]:
            fail(f"{s['file']}: row count differs from the manifest")
        frame = pd.read_parquet(path)
        if len(frame) != s["rows"] or list(frame.columns[:6]) != ["genes", "expressions", "bins", "n_counts", "cell_id", "dataset"]:
            fail(f"{s['file']}: pandas reads {len(frame)} rows with columns {list(frame.columns)}")
        for col in obs_cols:
            if not isinstance(frame[col].dtype, pd.CategoricalDtype):
                fail(f"{s['file']}: obs column {col} is {frame[col].dtype}, expected a dictionary (categorical)")
    checked = 0
    for h5 in a.h5ad:
        stem = os.path.splitext(os.path.basename(h5))[0]
        adata = ad.read_h5ad(h5)
        X = adata.raw.X if adata.raw is not None else adata.X
        X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
        names = gene_names(adata, a.gene_col)
        ids = vocab_ids(names, vocab, ens)
        if a.per10k > 0:
            totals = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
            thr = a.per10k / 10000.0 * X.shape[0]
            ids = [i if (t >= thr and t > 0) else None for i, t in zip(ids, totals)]
        keep = np.ones(X.shape[0], dtype=bool)
        for f in a.obs_filter:
            col, pred = keeps(f, None)
            keep &= np.array([pred(str(v)) for v in adata.obs[col].astype(str)])
        files = [s["file"] for s in manifest["shards"] if s["dataset"] == stem]
        if not files:
            fail(f"no shards for dataset {stem}")
        table = pa.concat_tables([pq.read_table(os.path.join(a.shards, f)) for f in files]).to_pydict()
        k = 0
        for row in range(X.shape[0]):
            if not keep[row]:
                continue
            lo_ptr, hi_ptr = X.indptr[row], X.indptr[row + 1]
            genes, vals = [], []
            for c, v in zip(X.indices[lo_ptr:hi_ptr], X.data[lo_ptr:hi_ptr]):
                if ids[c] is None:
                    continue
                v = np.float32(v)
                if not a.allow_non_integer:
                    r = np.round(v)
                    if abs(v - r) > 1e-3 * max(1.0, abs(r)):
                        fail(f"{h5}: row {row} has non-integer {v}; the run should have failed")
                    v = np.float32(r)
                if v != 0:
                    genes.append(ids[c])
                    vals.append(v)
            if len(genes) == 0 or len(genes) < a.min_genes:
                continue
            if k >= len(table["cell_id"]):
                fail(f"{stem}: shards end after {k} cells; cell {adata.obs_names[row]} missing")
            if table["cell_id"][k] != adata.obs_names[row]:
                fail(f"{stem}: shard cell {k} is {table['cell_id'][k]}, expected {adata.obs_names[row]}")
            if table["genes"][k] != genes:
                fail(f"{stem}: cell {adata.obs_names[row]} genes differ")
            if not np.array_equal(np.asarray(table["expressions"][k], dtype=np.float32), np.asarray(vals, dtype=np.float32)):
                fail(f"{stem}: cell {adata.obs_names[row]} expressions differ")
            if not np.isclose(table["n_counts"][k], float(np.sum(np.asarray(vals, dtype=np.float64))), rtol=1e-5):
                fail(f"{stem}: cell {adata.obs_names[row]} n_counts {table['n_counts'][k]}")
            if table["dataset"][k] != stem:
                fail(f"{stem}: dataset column {table['dataset'][k]}")
            for col in obs_cols:
                want = adata.obs[col].iloc[row]
                want = "" if (isinstance(want, float) and np.isnan(want)) else str(want)
                if table[col][k] != want:
                    fail(f"{stem}: cell {adata.obs_names[row]} obs {col} = {table[col][k]!r}, expected {want!r}")
            lo, hi = bin_range(vals, a.n_bins)
            bins = np.asarray(table["bins"][k])
            if np.any(bins < lo) or np.any(bins > hi):
                fail(f"{stem}: cell {adata.obs_names[row]} bins outside the original's range")
            if a.deterministic and not np.array_equal(bins, lo):
                fail(f"{stem}: cell {adata.obs_names[row]} deterministic bins are not the lowest tied bins")
            k += 1
            checked += 1
        if k != len(table["cell_id"]):
            fail(f"{stem}: shards hold {len(table['cell_id'])} cells, expected {k}")
    if checked != manifest["total_cells"]:
        fail(f"manifest total_cells {manifest['total_cells']} != {checked}")
    print(f"OK: {checked} cells match")


if __name__ == "__main__":
    main()
