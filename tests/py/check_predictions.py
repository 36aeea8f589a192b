"""Reads `scgpt predict` output back with anndata and checks it independently.

Usage: check_predictions.py INPUT.h5ad OUTPUT.h5ad [LABEL_COL REPORT_DIR]
Prints a JSON summary; exits non-zero with a message on the first violated property:
- the output keeps the input (same cells, genes, X, obs columns);
- obsm["scgpt_probs"] rows sum to 1 and its columns follow uns["scgpt_classes"];
- obs["scgpt_label"] is categorical and equals the argmax class (or "Unknown"),
  obs["scgpt_confidence"] the row maximum;
- with a label column: metrics.json equals accuracy / macro precision, recall, F1 / weighted F1
  computed here over the union of true and predicted labels (scikit-learn's definitions,
  zero_division=0), and confusion.csv is the square count matrix.
"""
import csv
import json
import sys

import anndata
import numpy as np


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def main():
    inp, out = sys.argv[1], sys.argv[2]
    a, b = anndata.read_h5ad(inp), anndata.read_h5ad(out)
    if a.shape != b.shape or list(a.obs_names) != list(b.obs_names) or list(a.var_names) != list(b.var_names):
        fail("the output does not keep the input's cells and genes")
    xa = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    xb = b.X.toarray() if hasattr(b.X, "toarray") else np.asarray(b.X)
    if not np.array_equal(xa, xb):
        fail("X changed")
    for c in a.obs.columns:
        if c not in b.obs.columns:
            fail(f"obs column {c} lost")
    classes = [str(c) for c in b.uns["scgpt_classes"]]
    probs = np.asarray(b.obsm["scgpt_probs"], dtype=np.float64)
    if probs.shape != (b.n_obs, len(classes)):
        fail(f"scgpt_probs shape {probs.shape}, want {(b.n_obs, len(classes))}")
    sums = probs.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-4):
        fail(f"probability rows do not sum to 1: {sums.min()}..{sums.max()}")
    if not isinstance(b.obs["scgpt_label"].dtype, __import__("pandas").CategoricalDtype):
        fail("scgpt_label is not categorical")
    pred = b.obs["scgpt_label"].astype(str).to_numpy()
    argmax = np.array(classes)[probs.argmax(axis=1)]
    ok = (pred == argmax) | (pred == "Unknown")
    # A kNN vote breaks ties by the closest neighbour, so the label is one of the tied maxima.
    tied = probs[np.arange(len(pred)), [classes.index(p) if p in classes else 0 for p in pred]] >= probs.max(axis=1) - 1e-6
    if not np.all(ok | tied):
        fail(f"{int((~(ok | tied)).sum())} labels are not the argmax class")
    conf = b.obs["scgpt_confidence"].to_numpy()
    if not np.allclose(conf, probs.max(axis=1), atol=1e-6):
        fail("scgpt_confidence is not the top probability")
    summary = {"cells": int(b.n_obs), "classes": len(classes), "unknown": int((pred == "Unknown").sum())}
    if len(sys.argv) > 3:
        col, rep = sys.argv[3], sys.argv[4]
        truth = b.obs[col].astype(str).to_numpy()
        labels = sorted(set(truth) | set(pred))
        m = json.load(open(f"{rep}/metrics.json"))
        p, r, f, s = [], [], [], []
        for l in labels:
            tp = np.sum((pred == l) & (truth == l))
            npred, ntrue = np.sum(pred == l), np.sum(truth == l)
            pi = tp / npred if npred else 0.0
            ri = tp / ntrue if ntrue else 0.0
            fi = 2 * pi * ri / (pi + ri) if pi + ri else 0.0
            p.append(pi); r.append(ri); f.append(fi); s.append(ntrue)
        want = {
            "accuracy": float(np.mean(pred == truth)),
            "macro_precision": float(np.mean(p)),
            "macro_recall": float(np.mean(r)),
            "macro_f1": float(np.mean(f)),
            "weighted_f1": float(np.average(f, weights=s)),
        }
        for k, v in want.items():
            if abs(m[k] - v) > 1e-9:
                fail(f"metrics.json {k} = {m[k]}, recomputed {v}")
        rows = list(csv.reader(open(f"{rep}/confusion.csv")))
        if rows[0][1:] != labels or [r[0] for r in rows[1:]] != labels:
            fail("confusion.csv axes are not the label union in the same order")
        counts = np.array([[int(x) for x in r[1:]] for r in rows[1:]])
        for i, t in enumerate(labels):
            for j, q in enumerate(labels):
                if counts[i, j] != np.sum((truth == t) & (pred == q)):
                    fail(f"confusion.csv[{t}][{q}] wrong")
        summary.update(want)
    print(json.dumps(summary))


main()
