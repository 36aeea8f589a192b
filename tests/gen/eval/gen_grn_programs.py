#!/usr/bin/env python3
"""Generate crates/scgpt-eval/tests/data/grn_programs.json: gene programs from a planted gene
embedding as scGPT's `GeneEmbedding` finds them, the truth for `scgpt_eval::grn::gene_programs`
(test: crates/scgpt-eval/tests/grn_programs.rs).

scGPT is imported, not copied: `scgpt/tasks/grn.py` of scgpt 0.2.4 is loaded on its own (the
package __init__ needs torch) and its `GeneEmbedding(embeddings).get_adata(resolution=40)` runs
scanpy's `neighbors` (15 neighbours, euclidean, on the vectors, read back as float32 through
`sc.read_text`) and `leiden` (leidenalg, resolution 40, random_state 0, n_iterations -1), and
`get_metagenes` groups the genes by cluster.

The embedding (numpy RandomState(0)): 100 planted clusters of 5-12 genes in 16 dimensions
(centres N(0, 3²), members centre + N(0, 0.5²)) and 50 scattered genes N(0, 3²), rounded to
3 decimals; stored as integers (value × 1000), so both sides read the same float32 values.

The file holds the gene names, the vectors, each gene's planted cluster (-1: scattered), each
gene's Leiden cluster from scanpy, and the programs (clusters of >= 5 genes) as gene lists.
The generator prints how well scanpy recovers the planted clusters (ARI over the planted genes
must be 1, or the fixture is refused).

Usage: /work/venv-sc/bin/python tests/gen/eval/gen_grn_programs.py
"""
import glob
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "crates" / "scgpt-eval" / "tests" / "data" / "grn_programs.json"
SCGPT_GRN = os.environ.get("SCGPT_GRN_PY") or glob.glob("/work/venv-torch/lib/python3*/site-packages/scgpt/tasks/grn.py")[0]
N_CLUSTERS, N_SCATTER, DIM, MIN_SIZE = 100, 50, 16, 5


def load_grn():
    spec = importlib.util.spec_from_file_location("scgpt_tasks_grn", SCGPT_GRN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def planted():
    rs = np.random.RandomState(0)
    sizes = rs.randint(5, 13, size=N_CLUSTERS)
    xs, lab = [], []
    for c, s in enumerate(sizes):
        centre = rs.normal(0, 3.0, DIM)
        xs.append(centre + rs.normal(0, 0.5, (s, DIM)))
        lab += [c] * s
    xs.append(rs.normal(0, 3.0, (N_SCATTER, DIM)))
    lab += [-1] * N_SCATTER
    milli = np.rint(np.vstack(xs) * 1000).astype(np.int64)
    # Shuffle the genes so that clusters are not contiguous.
    order = rs.permutation(len(lab))
    return milli[order], np.array(lab)[order]


def main():
    grn = load_grn()
    milli, lab = planted()
    genes = [f"G{i:04d}" for i in range(len(lab))]
    vectors = milli / 1000.0
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # get_adata writes .tmp.txt in the working directory
        try:
            emb = grn.GeneEmbedding({g: v for g, v in zip(genes, vectors)})
            gdata = emb.get_adata(resolution=40)
        finally:
            os.chdir(cwd)
    leiden = gdata.obs["leiden"].astype(int).to_numpy()
    metagenes = emb.get_metagenes(gdata)
    programs = {k: v for k, v in metagenes.items() if len(v) >= MIN_SIZE}
    m = lab >= 0
    ari = adjusted_rand_score(lab[m], leiden[m])
    print(f"{len(genes)} genes, {leiden.max() + 1} Leiden clusters, {len(programs)} programs; ARI on planted genes {ari:.4f}")
    assert ari == 1.0, "scanpy does not recover the planted clusters; change the design"
    out = {
        "versions": {p: importlib.metadata.version(p) for p in ["scanpy", "leidenalg", "igraph", "numpy", "scikit-learn", "umap-learn"]},
        "scgpt_grn_py": "scgpt 0.2.4 scgpt/tasks/grn.py",
        "resolution": 40,
        "min_program_size": MIN_SIZE,
        "dim": DIM,
        "genes": genes,
        "vectors_milli": milli.ravel().tolist(),
        "planted": lab.tolist(),
        "scanpy_leiden": leiden.tolist(),
        "scanpy_programs": {k: v for k, v in sorted(programs.items(), key=lambda kv: int(kv[0]))},
    }
    programs_json = out.pop("scanpy_programs")
    text = json.dumps(out, indent=1)
    for key in ["vectors_milli", "planted", "scanpy_leiden", "genes"]:
        one_line = json.dumps(out[key], separators=(",", ":"))
        start = text.index(f'"{key}": [')
        end = text.index("]", start) + 1
        text = text[:start] + f'"{key}": ' + one_line + text[end:]
    # One program per line.
    lines = ",\n".join(f'  "{k}": ' + json.dumps(v, separators=(",", ":")) for k, v in programs_json.items())
    text = text[:-2] + ',\n "scanpy_programs": {\n' + lines + "\n }\n}"
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
