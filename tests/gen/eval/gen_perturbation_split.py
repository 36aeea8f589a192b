#!/usr/bin/env python3
"""Generate crates/scgpt-eval/tests/data/perturbation_split_{combos,singles,combo_heavy}.json and
perturbation_numpy_rng.json: GEARS's own condition splits, the truth for
`scgpt_eval::perturbation::split` (test: crates/scgpt-eval/tests/perturbation_split.rs).

GEARS is imported, not copied: `DataSplitter.split_data` of cell-gears 0.0.2 (the version
scGPT 0.2.4 pins, `<0.0.3`) runs with the arguments `PertData.prepare_split` passes, on an
`adata` whose obs holds only a `condition` column (the splitter reads nothing else); see
`run_split` for the one line of prepare_split redone here. The modules GEARS imports but the split
never uses (torch, torch_geometric, scanpy, sklearn, dcor, statsmodels, requests) are stubbed,
and the package is loaded without its __init__ (which imports the model).

`no_test` differs between releases, so it is also run with cell-gears 0.1.2 (an unpacked wheel:
GEARS_012 below). `simulation` is the same code in both.

Three condition lists (made with a fixed numpy Generator, separate from the legacy global
stream GEARS seeds): `combos` (24 genes, 20 singles, 60 doubles), `singles` (70 singles, the
Adamson shape), `combo_heavy` (14 genes, 6 singles, all 91 pairs). Each list is written as cells
in a shuffled order (1-3 cells per condition); `conditions` is the order of first appearance,
which is the order GEARS's set2conditions lists follow. Cases: simulation with seeds 1 and 7
(train_gene_set_size = combo_seen2_train_frac = 0.75), no_test with seeds 1 and 7 under both
releases. Each case records GEARS's set2conditions (ctrl included, as GEARS has it) and for
simulation its subgroup dict {test_subgroup, val_subgroup}.

perturbation_numpy_rng.json: raw MT19937 outputs and legacy choice/permutation/randint draws.

Usage (any venv with numpy and pandas, plus the two GEARS releases):
    /work/venv-sc/bin/pip install --no-deps cell-gears==0.0.2
    pip download --no-deps cell-gears==0.1.2 -d /tmp/gears012 &&
        (cd /tmp/gears012 && python3 -m zipfile -e cell_gears-0.1.2-py3-none-any.whl unpacked)
    GEARS_012=/tmp/gears012/unpacked /work/venv-sc/bin/python tests/gen/eval/gen_perturbation_split.py
"""
import importlib
import importlib.metadata
import importlib.util
import io
import contextlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "crates" / "scgpt-eval" / "tests" / "data"
GEARS_012 = Path(os.environ.get("GEARS_012", "/tmp/gears012/unpacked"))
SEEDS = [1, 7]
GENES = [
    "AHR", "ARID1A", "BAK1", "BCL2L11", "C19orf26", "C3orf72", "CBL", "CDKN1A", "CEBPA",
    "CEBPB", "CNN1", "DUSP9", "ETS2", "FOXA1", "HK2", "HLA-A", "IGDCC3", "KLF1", "MAP2K3",
    "MAP2K6", "MIR17HG", "RP11-1", "ZBTB10", "lnc-7",
]


class _Stub(types.ModuleType):
    """A module whose every missing attribute is a placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def stub(name):
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        full = ".".join(parts[:i])
        if full not in sys.modules or not isinstance(sys.modules[full], _Stub):
            sys.modules[full] = _Stub(full)
        if i > 1:
            setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[full])


def load_gears(package, path):
    """Imports gears' pertdata and data_utils from `path` without running its __init__."""
    for name in ["torch", "torch.nn", "torch_geometric", "torch_geometric.data", "scanpy", "sklearn",
                 "sklearn.linear_model", "sklearn.metrics", "dcor", "statsmodels", "statsmodels.api",
                 "requests"]:
        stub(name)
    pkg = types.ModuleType(package)
    pkg.__path__ = [str(path)]
    sys.modules[package] = pkg
    return importlib.import_module(f"{package}.pertdata")


def run_split(pertdata, cells, split, seed):
    """GEARS's DataSplitter.split_data called as PertData.prepare_split calls it (same arguments
    per release and split); returns (set2conditions, subgroup).

    prepare_split's last step, `adata.obs.groupby('split').agg({'condition': lambda x: x})`
    then `.unique()` per group, fails under pandas 2 (agg hands back ndarrays); under the pandas
    1.x GEARS was written for it gives each split's conditions in order of first appearance, which
    is what `set2conditions` below computes.
    """
    adata = types.SimpleNamespace(obs=pd.DataFrame({"condition": cells}))
    ds = pertdata.DataSplitter(adata, split_type=split)
    subgroup = None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if split == "simulation":
            adata, subgroup = ds.split_data(train_gene_set_size=0.75, combo_seen2_train_frac=0.75,
                                            seed=seed, test_perts=None, only_test_set_perts=False)
        elif pertdata.__name__.startswith("gears012"):
            adata = ds.split_data(seed=seed)
        else:
            adata = ds.split_data(test_size=0.1, seed=seed)
    obs = adata.obs
    s2c = {k: [str(c) for c in pd.unique(obs.condition[obs.split == k])] for k in sorted(obs.split.unique())}
    sub = None
    if subgroup is not None:
        sub = {k: {g: [str(c) for c in v] for g, v in d.items()} for k, d in subgroup.items()}
    return s2c, sub


def condition_lists():
    gen = np.random.default_rng(2024)
    lists = {}

    def single(g):
        return f"ctrl+{g}" if gen.random() < 0.2 else f"{g}+ctrl"

    def pairs(genes, n):
        all_pairs = [(a, b) for i, a in enumerate(genes) for b in genes[i + 1:]]
        pick = gen.permutation(len(all_pairs))[:n] if n is not None else range(len(all_pairs))
        out = []
        for k in pick:
            a, b = all_pairs[k]
            out.append(f"{a}+{b}" if gen.random() < 0.5 else f"{b}+{a}")
        return out

    g = list(gen.permutation(GENES))
    lists["combos"] = [single(x) for x in g[:20]] + pairs(g, 60)
    lists["singles"] = [single(f"G{k:03d}") for k in gen.permutation(90)[:66]] + [single(x) for x in g[:4]]
    g14 = list(gen.permutation(GENES)[:14])
    lists["combo_heavy"] = [single(x) for x in g14[:6]] + pairs(g14, None)
    cells = {}
    for name, perts in lists.items():
        c = ["ctrl"] * 5
        for p in perts:
            c += [p] * int(gen.integers(1, 4))
        cells[name] = [c[k] for k in gen.permutation(len(c))]
    return cells


def numpy_rng_fixture():
    out = {"numpy": np.__version__, "cases": []}
    np.random.seed(1)
    raw = np.random.randint(0, 2**32, size=1300, dtype=np.uint64)
    out["raw_seed1"] = {str(i): int(raw[i]) for i in list(range(5)) + [623, 624, 625, 1247, 1248, 1299]}
    np.random.seed(1)
    out["cases"].append({"seed": 1, "call": "choice(20, 7, replace=False)",
                         "values": np.random.choice(20, 7, replace=False).tolist()})
    out["cases"].append({"seed": None, "call": "permutation(10)", "values": np.random.permutation(10).tolist()})
    out["cases"].append({"seed": None, "call": "choice(5, 10)", "values": np.random.choice(5, 10).tolist()})
    lst = list(range(12))
    np.random.shuffle(lst)
    out["cases"].append({"seed": None, "call": "shuffle(list(range(12)))", "values": lst})
    out["cases"].append({"seed": None, "call": "randint(0, 2**40, size=3)",
                         "values": np.random.randint(0, 2**40, size=3).tolist()})
    np.random.seed(4294967295)
    out["cases"].append({"seed": 4294967295, "call": "choice(1000, 5, replace=False)",
                         "values": np.random.choice(1000, 5, replace=False).tolist()})
    np.random.seed(0)
    out["cases"].append({"seed": 0, "call": "choice(3, 3, replace=False)",
                         "values": np.random.choice(3, 3, replace=False).tolist()})
    return out


def main():
    new_pd = None
    if GEARS_012.exists():
        new_pd = load_gears("gears012", GEARS_012 / "gears")
    else:
        sys.exit(f"GEARS_012={GEARS_012} does not exist; see the usage in this file's docstring")
    spec = importlib.util.find_spec("gears")
    if spec is None:
        sys.exit("cell-gears 0.0.2 is not installed: pip install --no-deps cell-gears==0.0.2")
    gears_version = importlib.metadata.version("cell-gears")
    if gears_version != "0.0.2":
        sys.exit(f"need cell-gears==0.0.2, found {gears_version}")
    old_pd = load_gears("gears", spec.submodule_search_locations[0])
    new_version = (GEARS_012 / "gears" / "version.py").read_text().split("__version__ = '")[1].split("'")[0]

    versions = {"cell-gears": gears_version, "cell-gears (no_test, second release)": new_version,
                "numpy": np.__version__, "pandas": pd.__version__}
    for name, cells in condition_lists().items():
        conditions = list(dict.fromkeys(cells))
        cases = []
        for seed in SEEDS:
            s2c, sub = run_split(old_pd, cells, "simulation", seed)
            cases.append({"split": "simulation", "seed": seed, "set2conditions": s2c, "subgroup": sub})
        for seed in SEEDS:
            for rule, mod in [("cell-gears 0.0.2", old_pd), (f"cell-gears {new_version}", new_pd)]:
                s2c, _ = run_split(mod, cells, "no_test", seed)
                cases.append({"split": "no_test", "seed": seed, "gears": rule, "set2conditions": s2c})
        out = {"versions": versions, "n_cells": len(cells), "conditions": conditions, "cases": cases}
        path = OUT / f"perturbation_split_{name}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path} ({len(conditions) - 1} perturbations)")
    path = OUT / "perturbation_numpy_rng.json"
    path.write_text(json.dumps(numpy_rng_fixture(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
