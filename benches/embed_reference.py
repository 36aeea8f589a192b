#!/usr/bin/env python3
"""The original's zero-shot embedding path, timed: scgpt 0.2.4 `scgpt.tasks.cell_emb.embed_data`.

Runs the original code unmodified on CPU (flash-attn absent, so its model falls back to
PyTorch's nn.TransformerEncoder, as on any CPU machine), with the same stand-ins for unused
imports as tests/gen/embed/gen_embed_reference.py. Prints one JSON line:
  cells, wall_total_s (read + build + load + embed + normalise), wall_embed_s (the DataLoader +
  forward loop, `get_batch_cell_embeddings`), threads, batch_size, peak_rss_mb (this process and
  its DataLoader workers)
and writes obsm["X_scGPT"] to --out (.npy).

Usage (venv with torch, numpy, tqdm, anndata and `pip install --no-deps scgpt==0.2.4`):
  python benches/embed_reference.py --model DIR --h5ad FILE --out ref.npy --threads 2
"""

import argparse
import importlib.util
import json
import resource
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--h5ad", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1200)
    ap.add_argument("--gene-col", default="feature_name")
    a = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location(
        "gen_embed_reference", REPO / "tests" / "gen" / "embed" / "gen_embed_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    _, cell_emb = gen.import_original()

    timing = {}
    inner = cell_emb.get_batch_cell_embeddings

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        timing["embed"] = time.perf_counter() - t
        return out

    cell_emb.get_batch_cell_embeddings = timed
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = cell_emb.embed_data(a.h5ad, a.model, gene_col=a.gene_col, max_length=a.max_length,
                                    batch_size=a.batch_size, device="cpu")
    total = time.perf_counter() - t0
    emb = np.asarray(adata.obsm["X_scGPT"], dtype=np.float32)
    np.save(a.out, emb)
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"cells": int(emb.shape[0]), "wall_total_s": round(total, 3),
                      "wall_embed_s": round(timing["embed"], 3), "threads": a.threads,
                      "batch_size": a.batch_size, "torch": torch.__version__,
                      "peak_rss_mb": round(rss / 1024, 1)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
