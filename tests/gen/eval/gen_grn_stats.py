#!/usr/bin/env python3
"""Generate the enrichment and reference-scoring fixtures for `scgpt_eval::grn`
(tests: crates/scgpt-eval/tests/grn_enrich.rs, crates/scgpt-eval/tests/grn_reference.rs):

- `grn_sets.gmt`: 40 gene sets (GMT: name, description, genes, tab separated) over genes
  `U00000`..`U19999` plus names outside the universe; one set repeats a gene, one has no gene in
  the universe, one has trailing tabs.
- `grn_enrich.json`: the universe size (genes `U00000`.. in order), gene lists, and per list, per
  tested set (a set with no gene in the universe is not tested), the overlap, scipy's
  `hypergeom.sf(k - 1, M, n, N)` and statsmodels' `multipletests(p, method="fdr_bh")` adjusted p.
  Universe rule as the port states it: M = |universe|, n = |set ∩ universe|, N = |list ∩
  universe|, k = |list ∩ set ∩ universe|.
- `grn_ranking.json`: fixed scores (2 decimals, so ties) with binary labels, and scikit-learn's
  `roc_auc_score` and `average_precision_score` per case.
- `grn_reference.tsv`: a reference network (comment lines, a header, regulator / target / sign,
  a repeated edge, a self edge, regulators and targets outside the predicted genes).
- `grn_reference.json`: the predicted genes, a dense predicted score matrix (2 decimals), an
  expression matrix (float32 CSR over its own gene names: some predicted genes absent, one
  constant), and the candidate pairs the port documents (E = predicted genes named by the
  reference; every (r, t), r ∈ E a reference regulator, t ∈ E, t ≠ r), their labels, and
  scikit-learn's AUROC / average precision of the model scores and of the coexpression baseline
  (|Pearson| from np.corrcoef in float64, made exactly symmetric; 0 for absent or constant genes).
  The generator checks that no two coexpression scores of different pairs lie within 1e-9
  unless they are equal, so the rankings cannot depend on the last bits.

Usage: /work/venv-sc/bin/python tests/gen/eval/gen_grn_stats.py
"""
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.stats import hypergeom
from sklearn.metrics import average_precision_score, roc_auc_score
from statsmodels.stats.multitest import multipletests

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "crates" / "scgpt-eval" / "tests" / "data"
VERSIONS = {p: importlib.metadata.version(p) for p in ["numpy", "scipy", "scikit-learn", "statsmodels"]}
M = 20000


def dump(path, obj):
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def enrichment():
    rng = np.random.default_rng(3)
    uni = [f"U{i:05d}" for i in range(M)]
    sets = []
    for s in range(40):
        size = int(rng.integers(5, 400))
        genes = [uni[i] for i in rng.choice(M, size, replace=False)]
        if s % 5 == 0:
            genes += [f"OUT{s}_{j}" for j in range(3)]  # outside the universe
        sets.append([f"SET_{s:02d}", f"description of set {s}", genes])
    # Lists: one drawn mostly from set 3 (tiny p), one from sets 7 and 8, one random, one small.
    lists = {
        "from_set3": sets[3][2][:40] + [uni[i] for i in rng.choice(M, 60, replace=False)] + ["NOT_IN_UNIVERSE"],
        "from_sets7_8": sets[7][2][:10] + sets[8][2][:6] + [uni[i] for i in rng.choice(M, 200, replace=False)],
        "random": [uni[i] for i in rng.choice(M, 300, replace=False)],
        "small": sets[12][2][:3] + [uni[5]],
    }
    sets[10][2] = sets[10][2][:6] + [sets[10][2][0]]  # a repeated gene
    sets[11][2] = ["OUT_A", "OUT_B"]  # nothing in the universe: not tested
    sets[12][2] = sets[12][2][:8]  # small set, fully hit by "small"
    lines = []
    for i, (name, desc, genes) in enumerate(sets):
        tail = "\t\t" if i == 20 else ""
        lines.append("\t".join([name, desc] + genes) + tail)
    gmt = DATA / "grn_sets.gmt"
    gmt.write_text("\n".join(lines) + "\n")
    print(f"wrote {gmt}")
    universe = set(uni)
    cases = {}
    for lname, lst in lists.items():
        lst_u = list(dict.fromkeys(g for g in lst if g in universe))
        rows = []
        for name, _, genes in sets:
            members = set(g for g in genes if g in universe)
            if not members:
                continue
            k = sum(g in members for g in lst_u)
            p = float(hypergeom.sf(k - 1, M, len(members), len(lst_u)))
            rows.append({"set": name, "set_size": len(members), "overlap": k, "p": p})
        adj = multipletests([r["p"] for r in rows], method="fdr_bh")[1]
        for r, a in zip(rows, adj):
            r["adjusted_p"] = float(a)
        cases[lname] = {"genes": lst, "list_size": len(lst_u), "rows": rows}
    dump(DATA / "grn_enrich.json", {"versions": VERSIONS, "universe_size": M, "universe_prefix": "U", "cases": cases})


def ranking():
    rng = np.random.default_rng(5)
    cases = []
    for n, prev, signal in [(200, 0.1, 1.0), (500, 0.02, 0.5), (60, 0.5, 0.0), (300, 0.3, 3.0)]:
        y = rng.random(n) < prev
        y[0], y[1] = True, False
        s = np.round(rng.normal(0, 1, n) + signal * y, 1 if n == 60 else 2)
        cases.append({"scores": s.tolist(), "labels": y.astype(int).tolist(),
                      "auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))})
    dump(DATA / "grn_ranking.json", {"versions": VERSIONS, "cases": cases})


def reference():
    rng = np.random.default_rng(9)
    predicted = [f"P{i:02d}" for i in range(60)]
    regs = ["P00", "P03", "P07", "P11", "P20", "P33", "TFX", "TFY"]
    edges = []
    for r in regs:
        for t in rng.choice(60, 9, replace=False):
            edges.append((r, predicted[t]))
        edges.append((r, f"T_OUT{len(edges)}"))
    edges.append(("P03", "P03"))  # a self edge: never a candidate
    signs = ["+", "-", "activation", "0.75", "unknown"]
    lines = ["# reference network for grn_reference.rs", "# regulator\ttarget\tmode", "TF\tTarget\tMode"]
    for i, (r, t) in enumerate(edges):
        lines.append(f"{r}\t{t}\t{signs[i % len(signs)]}")
    lines.append(f"{edges[4][0]}\t{edges[4][1]}\t-")  # repeated pair
    (DATA / "grn_reference.tsv").write_text("\n".join(lines) + "\n")
    ref_genes = {g for e in edges for g in e}
    ref_regs = {r for r, _ in edges}
    edge_set = set(edges)
    E = [i for i, g in enumerate(predicted) if g in ref_genes]
    R = [i for i in E if predicted[i] in ref_regs]
    truth = np.zeros((60, 60))
    for r, t in edges:
        if r in predicted and t in predicted:
            truth[predicted.index(r), predicted.index(t)] = 1
    scores = np.round(rng.normal(0, 1, (60, 60)) + 1.2 * truth, 2)
    # Expression: 80 cells over 70 genes (55 predicted ones, some extra); P50-P54 absent; P45 constant.
    var = [g for g in predicted if g not in {"P50", "P51", "P52", "P53", "P54"}] + [f"X{i}" for i in range(15)]
    base = rng.normal(0, 1, (80, 4))
    load = rng.normal(0, 1, (4, len(var)))
    lam = np.exp(0.6 * base @ load - 0.5)
    counts = rng.poisson(lam).astype(np.float32)
    counts[:, var.index("P45")] = 2.0
    X = np.log1p(counts / counts.sum(1, keepdims=True).clip(1) * 100).astype(np.float32)
    X[:, var.index("P45")] = 1.0
    Xs = sp.csr_matrix(X)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.abs(np.corrcoef(X.astype(np.float64).T))
    c = np.nan_to_num(c, nan=0.0)
    c = np.triu(c) + np.triu(c, 1).T  # exactly symmetric
    col = {g: j for j, g in enumerate(var)}
    cand, labels, model, coexp = [], [], [], []
    for r in R:
        for t in E:
            if t == r:
                continue
            cand.append([r, t])
            labels.append(int((predicted[r], predicted[t]) in edge_set))
            model.append(float(scores[r, t]))
            a, b = col.get(predicted[r]), col.get(predicted[t])
            coexp.append(0.0 if a is None or b is None else float(c[a, b]))
    labels_a, coexp_a = np.array(labels), np.array(coexp)
    # No near-ties between different scores.
    u = np.unique(coexp_a)
    assert np.all(np.diff(u) > 1e-9), "near-tied coexpression scores"
    out = {
        "versions": VERSIONS,
        "predicted": predicted,
        "scores": scores.ravel().tolist(),
        "var_names": var,
        "n_cells": X.shape[0],
        "indptr": Xs.indptr.tolist(),
        "indices": Xs.indices.tolist(),
        "data": "DATA",
        "genes_evaluated": E,
        "regulators_evaluated": R,
        "candidates": cand,
        "labels": labels,
        "n_reference_edges": len(set(edges)),
        "n_repeated_lines": len(edges) + 1 - len(set(edges)),
        "coexpression_scores": coexp,
        "model": {"auroc": float(roc_auc_score(labels_a, model)), "auprc": float(average_precision_score(labels_a, model))},
        "coexpression": {"auroc": float(roc_auc_score(labels_a, coexp_a)), "auprc": float(average_precision_score(labels_a, coexp_a))},
    }
    text = json.dumps(out, separators=(",", ":")).replace('"DATA"', "[" + ",".join(str(np.float32(v)) for v in Xs.data) + "]")
    path = DATA / "grn_reference.json"
    path.write_text(text + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes); {len(cand)} candidates, {sum(labels)} positives")


if __name__ == "__main__":
    enrichment()
    ranking()
    reference()
