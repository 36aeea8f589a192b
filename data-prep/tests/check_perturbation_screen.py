"""Independent check of a `scgpt-prep simulate-perturbation` screen, read with anndata + numpy.

Usage: check_perturbation_screen.py SCREEN.h5ad TRUTH.json

Checks the GEARS format (obs/var columns and dtypes, log-normalised float32 CSR X), that the
conditions and their cell counts are the planned ones, and that the planted effects can be
recovered from the data: knockdowns, the singles' target signs, additivity of additive doubles
and the synergy doubles' own targets, which no single explains. Prints "OK: ..." on success;
any failed check raises AssertionError with the numbers.
"""

import json
import sys

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp


def main(h5ad_path, truth_path):
    a = anndata.read_h5ad(h5ad_path)
    with open(truth_path) as f:
        t = json.load(f)
    args = t["args"]

    # --- format -------------------------------------------------------------------------
    assert a.shape == (t["n_cells"], args["genes"]), (a.shape, t["n_cells"], args["genes"])
    assert list(a.obs.columns) == ["condition", "cell_type", "dose_val", "control", "condition_name"], list(a.obs.columns)
    for c in ["condition", "cell_type", "dose_val", "condition_name"]:
        assert isinstance(a.obs[c].dtype, pd.CategoricalDtype), (c, a.obs[c].dtype)
    assert np.issubdtype(a.obs["control"].dtype, np.integer), a.obs["control"].dtype
    cond = a.obs["condition"].astype(str).to_numpy()
    dose = a.obs["dose_val"].astype(str).to_numpy()
    ct = a.obs["cell_type"].astype(str).to_numpy()
    assert (ct == args["cell_type"]).all()
    is_ctrl = cond == "ctrl"
    assert (a.obs["control"].to_numpy() == is_ctrl.astype(int)).all(), "control = 1 exactly for ctrl cells"
    assert (dose[is_ctrl] == "1").all() and (dose[~is_ctrl] == "1+1").all(), "dose_val: 1 for ctrl, 1+1 otherwise"
    expected_name = np.array([f"{c}_{k}_{d}" for c, k, d in zip(ct, cond, dose)])
    assert (a.obs["condition_name"].astype(str).to_numpy() == expected_name).all(), "condition_name = {cell_type}_{condition}_{dose_val}"
    assert a.obs_names.is_unique

    assert list(a.var.columns) == ["gene_name"], list(a.var.columns)
    assert all(i.startswith("ENSG") for i in a.var_names), "var index holds Ensembl ids"
    symbols = a.var["gene_name"].astype(str).to_numpy()
    assert len(set(symbols)) == len(symbols), "gene symbols are unique"
    assert len(a.uns) == 0, f"uns should be empty, has {list(a.uns)}"

    X = a.X
    assert sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array), type(X)
    assert X.dtype == np.float32, X.dtype
    X = sp.csr_matrix(X)
    assert X.data.min() > 0 and X.max() <= 1000, "GEARS asserts max <= 1000"
    totals = np.asarray(np.expm1(X.astype(np.float64)).sum(axis=1)).ravel()
    assert np.allclose(totals, 1e4, rtol=1e-4), f"expm1 rows sum to 1e4: {totals.min()}..{totals.max()}"
    density = X.nnz / (X.shape[0] * X.shape[1])

    # --- conditions as planned ----------------------------------------------------------
    planned = {"ctrl": t["control"]["n_cells"]}
    for s in t["singles"]:
        assert s["condition"] == f"{s['gene']}+ctrl"
        planned[s["condition"]] = s["n_cells"]
    for d in t["doubles"]:
        assert d["condition"] == "+".join(d["genes"]) and d["genes"][0] < d["genes"][1]
        planned[d["condition"]] = d["n_cells"]
    assert len(t["singles"]) == args["perturbed_genes"] and len(t["doubles"]) == args["doubles"]
    n_syn = sum(d["kind"] == "synergy" for d in t["doubles"])
    assert n_syn == round(args["doubles"] * args["synergy_fraction"]), n_syn
    counts = pd.Series(cond).value_counts().to_dict()
    assert counts == planned, "condition cell counts differ from the plan"
    gene_set = set(symbols)
    for k in planned:
        for g in k.split("+"):
            assert g == "ctrl" or g in gene_set, f"perturbed gene {g} of {k} is not among the screen's genes"
    # The truth's indices point at the right var rows.
    for s in t["singles"]:
        for x in [s] + s["targets"]:
            assert symbols[x["index"]] == x["gene"] and a.var_names[x["index"]] == x["gene_id"], x
        assert s["gene"] not in {x["gene"] for x in s["targets"]}, "a gene is not its own target"
    # Cells of all conditions are interleaved, not in blocks.
    assert not is_ctrl[: t["control"]["n_cells"]].all()

    # --- planted effects ----------------------------------------------------------------
    dense = X.toarray().astype(np.float64)
    ctrl_mean = dense[is_ctrl].mean(axis=0)
    shift = {k: dense[cond == k].mean(axis=0) - ctrl_mean for k in planned if k != "ctrl"}
    single_of = {s["gene"]: s for s in t["singles"]}

    kd = np.array([shift[s["condition"]][s["index"]] for s in t["singles"]])
    assert (kd < 0).all(), f"every knocked-down gene falls: {kd}"

    agree, n_big, tgt_abs, all_abs = 0, 0, [], []
    for s in t["singles"]:
        sh = shift[s["condition"]]
        for x in s["targets"]:
            tgt_abs.append(abs(sh[x["index"]]))
            if abs(x["lfc"]) >= 1:
                n_big += 1
                agree += np.sign(sh[x["index"]]) == np.sign(x["lfc"])
        touched = {s["index"]} | {x["index"] for x in s["targets"]}
        all_abs.extend(abs(sh[j]) for j in range(len(sh)) if j not in touched)
    single_agree = agree / n_big
    assert single_agree >= 0.9, f"singles: planted sign recovered for {agree}/{n_big} targets with |lfc| >= 1"
    assert np.mean(tgt_abs) > 4 * np.mean(all_abs), (np.mean(tgt_abs), np.mean(all_abs))

    # Synergy doubles: their own targets move with the planted sign, while the sum of the two
    # singles' shifts on them is noise: as large as on genes neither single touches (the null
    # level of a 40-cell mean is ~0.15), and uncorrelated with the planted lfc.
    syn_agree, syn_big = 0, 0
    syn_lfc, syn_sum, syn_double, sum_on_targets, sum_on_free = [], [], [], [], []
    add_pred, add_obs = [], []
    for d in t["doubles"]:
        sa, sb = (shift[single_of[g]["condition"]] for g in d["genes"])
        sd = shift[d["condition"]]
        union = {single_of[g]["index"] for g in d["genes"]} | {x["index"] for g in d["genes"] for x in single_of[g]["targets"]}
        if d["kind"] == "synergy":
            idx = np.array([x["index"] for x in d["synergy_targets"]])
            assert not (set(idx) & union), "synergy targets are disjoint from A, B and the singles' targets"
            for x in d["synergy_targets"]:
                if abs(x["lfc"]) >= 1:
                    syn_big += 1
                    syn_agree += np.sign(sd[x["index"]]) == np.sign(x["lfc"])
            free = np.array([j for j in range(len(sd)) if j not in union and j not in set(idx)])
            syn_lfc.extend(x["lfc"] for x in d["synergy_targets"])
            syn_sum.extend(sa[idx] + sb[idx])
            syn_double.extend(sd[idx])
            sum_on_targets.append(np.abs(sa[idx] + sb[idx]).mean())
            sum_on_free.append(np.abs(sa[free] + sb[free]).mean())
        else:
            assert d["synergy_targets"] == []
            union = sorted(union)
            add_pred.extend(sa[union] + sb[union])
            add_obs.extend(sd[union])
    syn_agree_frac = syn_agree / max(syn_big, 1)
    r_sum = r_double = float("nan")
    if n_syn:
        assert syn_agree_frac >= 0.9, f"synergy doubles: sign recovered for {syn_agree}/{syn_big} own targets with |lfc| >= 1"
        r_sum, r_double = np.corrcoef(syn_lfc, syn_sum)[0, 1], np.corrcoef(syn_lfc, syn_double)[0, 1]
        assert r_double > 0.8, f"a synergy double's shift on its own targets follows the planted lfc: r = {r_double}"
        assert abs(r_sum) < 0.35, f"the singles' summed shift on synergy targets is unrelated to the planted lfc: r = {r_sum}"
        assert np.mean(sum_on_targets) < 1.5 * np.mean(sum_on_free), (
            f"the singles' summed shift on synergy targets ({np.mean(sum_on_targets)}) is at the level of untouched genes ({np.mean(sum_on_free)})"
        )
        assert np.mean(np.abs(syn_double)) > 2.5 * np.mean(sum_on_targets), (np.mean(np.abs(syn_double)), np.mean(sum_on_targets))
    add_r = np.corrcoef(add_pred, add_obs)[0, 1] if add_pred else float("nan")
    if add_pred:
        assert add_r > 0.8, f"additive doubles: shift vs sum of singles' shifts r = {add_r}"

    print(
        f"OK: {a.n_obs} cells x {a.n_vars} genes, {len(planned)} conditions, density {density:.3f}; "
        f"knockdown shifts {kd.min():.2f}..{kd.max():.2f}; single target signs {agree}/{n_big} = {single_agree:.3f}; "
        f"mean |shift| targets {np.mean(tgt_abs):.3f} vs others {np.mean(all_abs):.3f}; "
        f"synergy target signs {syn_agree}/{syn_big} = {syn_agree_frac:.3f}, r(planted lfc, double shift) = {r_double:.3f}, "
        f"r(planted lfc, singles' summed shift) = {r_sum:.3f}, mean |singles' sum| on synergy targets {np.mean(sum_on_targets) if n_syn else 0:.3f} "
        f"vs untouched genes {np.mean(sum_on_free) if n_syn else 0:.3f} vs |double shift| {np.mean(np.abs(syn_double)) if n_syn else 0:.3f}; "
        f"additive doubles r(double shift, singles' sum) = {add_r:.3f}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
