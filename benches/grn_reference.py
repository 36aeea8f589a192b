"""The original's GRN workflows in Python (CPU), for benches/grn_bench.sh.

Three steps, each timed in its own process, each printing one JSON line:

  embed      (torch venv) Tutorial_GRN's gene embeddings: the checkpoint loaded with torch, the
             chosen genes' ids through the encoder (LayerNorm(Embedding), as the tutorial's
             `model.encoder(gene_ids)`), saved as .npy for the next step.
  programs   (scanpy venv) the rest of Tutorial_GRN on those vectors: scGPT 0.2.4's own
             `tasks/grn.py` `GeneEmbedding(...).get_adata(resolution=40)` (its text round trip,
             scanpy neighbours, Leiden), `get_metagenes`, programs of >= 5 genes, and
             `score_metagenes` on the log-normalised cells (score_genes + MinMax per program);
             plus the cosine top-k edges of every gene with numpy (the tutorial's
             `compute_similarities` is a per-gene pandas loop; a matrix product is the fastest
             honest Python equivalent, so the reference gets the better of the two).
  attention  (torch venv) Tutorial_Attention_GRN cells 10-27 for one perturbed gene
             (tests/gen/model/check_grn_attention_in_torch.py's `tutorial`, model size from
             args.json): the control and GENE+ctrl cells, filter_gene_by_counts=3,
             normalize_total 1e4 and the Preprocessor's per-row binning with the original
             `_digitize`, `<cls>` + every kept gene a token (the bench's screen has ~1,200
             genes; ours runs with `--genes hvg:N`, N >= the genes, which keeps them all), then
             per batch of 16 the encoder up to the last layer, its q·kᵀ, the double argsort
             rank normalisation over rows then columns, the mean over heads and cells.

  python benches/grn_reference.py embed --model DIR --genes FILE --out vectors.npy
  python benches/grn_reference.py programs --vectors vectors.npy --genes FILE --input x.h5ad
  python benches/grn_reference.py attention --model DIR --input screen.h5ad --perturbed GENE
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def read_genes(path):
    return [line.strip() for line in open(path) if line.strip()]


def embed(a):
    import torch

    t0 = time.perf_counter()
    state = torch.load(a.model / "best_model.pt", map_location="cpu")
    vocab = json.load(open(a.model / "vocab.json"))
    t_load = time.perf_counter() - t0
    genes = read_genes(a.genes)
    t1 = time.perf_counter()
    ids = torch.tensor([vocab[g] for g in genes])
    w = state["encoder.embedding.weight"]
    with torch.no_grad():
        x = torch.nn.functional.layer_norm(w[ids], (w.shape[1],), state["encoder.enc_norm.weight"], state["encoder.enc_norm.bias"])
    np.save(a.out, x.numpy())
    print(json.dumps({"step": "embed", "genes": len(genes), "load_s": t_load, "embed_s": time.perf_counter() - t1,
                      "torch": torch.__version__}))


def programs(a):
    import anndata
    import scanpy as sc

    sys.path.insert(0, str(REPO / "tests/gen/eval"))
    from gen_grn_programs import load_grn  # scgpt 0.2.4's tasks/grn.py, loaded on its own

    grn = load_grn()
    # scanpy 1.11.5 calls `getnnz` on the kNN matrix that scikit-learn (>= 4,096 points, the
    # approximate path) returns as a scipy `csr_array`, which recent scipy no longer gives that
    # method; hand it the `csr_matrix` it expects (a version mismatch, not the original's cost).
    import scipy.sparse
    import scanpy.neighbors._common as sc_common
    shortcut = sc_common._ind_dist_shortcut
    sc_common._ind_dist_shortcut = lambda d: shortcut(scipy.sparse.csr_matrix(d))
    genes = read_genes(a.genes)
    vectors = np.load(a.vectors)
    t0 = time.perf_counter()
    # Cosine top-k edges of every gene.
    xn = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    edges = 0
    for start in range(0, len(genes), 2048):
        s = xn[start:start + 2048] @ xn.T
        s[np.arange(s.shape[0]), np.arange(start, start + s.shape[0])] = -np.inf
        top = np.argpartition(-s, a.top_k, axis=1)[:, :a.top_k]
        edges += top.size
    t_edges = time.perf_counter() - t0
    cwd = os.getcwd()
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # get_adata writes .tmp.txt in the working directory
        try:
            emb = grn.GeneEmbedding({g: v for g, v in zip(genes, vectors)})
            gdata = emb.get_adata(resolution=40)
        finally:
            os.chdir(cwd)
    metagenes = emb.get_metagenes(gdata)
    kept = {k: v for k, v in metagenes.items() if len(v) >= 5}
    t_programs = time.perf_counter() - t1
    t2 = time.perf_counter()
    adata = anndata.read_h5ad(a.input)
    adata.var_names = adata.var["gene_name"].astype(str) if "gene_name" in adata.var else adata.var_names
    adata.var_names_make_unique()
    emb.score_metagenes(adata, kept)
    t_activity = time.perf_counter() - t2
    print(json.dumps({"step": "programs", "genes": len(genes), "edges": int(edges), "programs": len(kept),
                      "edges_s": t_edges, "programs_s": t_programs, "activity_s": t_activity,
                      "cells": adata.n_obs, "scanpy": sc.__version__}))


def attention(a):
    import torch

    sys.path.insert(0, str(REPO / "tests/gen/model"))
    import check_grn_attention_in_torch as chk  # noqa: E402
    import gen_parity as gp  # noqa: E402
    torch.set_num_threads(a.threads)
    torch.backends.mha.set_fastpath_enabled(False)
    t0 = time.perf_counter()
    args = json.load(open(a.model / "args.json"))
    vocab = json.load(open(a.model / "vocab.json"))
    mm = gp.import_original_model()
    model = mm.TransformerModel(
        ntoken=len(vocab), d_model=args["embsize"], nhead=args["nheads"], d_hid=args["d_hid"],
        nlayers=args["nlayers"], nlayers_cls=args.get("n_layers_cls", 3), dropout=0.0,
        vocab=gp.Vocab({"<pad>": vocab["<pad>"]}), pad_token="<pad>", pad_value=args["pad_value"],
        input_emb_style="continuous", use_fast_transformer=False,
    )
    # The checkpoint has flash-attn's `Wqkv` names; the PyTorch attention wants `in_proj_`.
    state = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in torch.load(a.model / "best_model.pt", map_location="cpu").items()}
    missing = model.load_state_dict(state, strict=False)
    assert not [k for k in missing.missing_keys if not k.startswith("cls_decoder")], missing
    model.eval()
    t_load = time.perf_counter() - t0
    digitize = chk.original_digitize()
    t1 = time.perf_counter()
    # The notebook's loop (check_grn_attention_in_torch.tutorial), model size from args.json.
    chk.N_LAYERS, chk.H, chk.D = args["nlayers"], args["nheads"], args["embsize"]
    if not hasattr(model, "bn"):
        model.bn = torch.nn.Identity()
    genes, every, _, count = chk.tutorial(model, a.input, a.perturbed, vocab, digitize)
    t_scores = time.perf_counter() - t1
    print(json.dumps({"step": "attention", "cells": sum(count.values()), "tokens": len(genes) + 1,
                      "load_s": t_load, "scores_s": t_scores, "torch": torch.__version__}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--genes", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("programs")
    p.add_argument("--vectors", type=Path, required=True)
    p.add_argument("--genes", type=Path, required=True)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=20)
    t = sub.add_parser("attention")
    t.add_argument("--model", type=Path, required=True)
    t.add_argument("--input", type=Path, required=True)
    t.add_argument("--perturbed", required=True)
    t.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    {"embed": embed, "programs": programs, "attention": attention}[a.cmd](a)


if __name__ == "__main__":
    main()
