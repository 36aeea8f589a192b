#!/usr/bin/env python3
"""Fixtures for `scgpt embed` (crates/scgpt-cli), produced by the ORIGINAL scGPT embedding code.

The reference embeddings come from the original `scgpt.tasks.cell_emb.embed_data` of the PyPI
wheel scgpt==0.2.4 (installed into the venv with --no-deps), run unmodified on CPU: its
`DataCollator` (binning with 51 bins, cls with pad_value, padding), `TransformerModel` and
`load_pretrained` (flash `Wqkv` names renamed to `in_proj_` because flash-attn is absent), the
`<cls>` position and the L2 normalisation. Nothing of that code is copied here; only imports
the recipe does not use are replaced by stand-ins (see `import_original`).

Writes into tests/data/embed/:
  model/best_model.pt   a tiny TransformerModel (d 32, 4 heads, d_hid 64, 2 layers) with the
                        whole-human checkpoint's naming: flash `Wqkv`, `flag_encoder.weight`, no
                        `cls_decoder.*`; every parameter randomised (gen_parity.randomise)
  model/vocab.json      403 tokens: 400 real gene symbols (a slice of the whole-human vocabulary,
                        in its id order) + <pad>, <cls>, <eoc>
  model/args.json       the whole-human args.json model fields at the tiny size
  wu30.h5ad             30 cells of tests/data/wu2020_200.h5ad (integer UMI counts, CSR) on 470
                        genes in shuffled order: the 400 vocabulary genes, 30 genes of the
                        whole-human vocabulary that the tiny vocabulary lacks, 40 genes in neither.
                        var index = Ensembl id where GENCODE has one that maps back to the symbol,
                        else the symbol; var column `feature_name` = the symbols
  wu30_tiefree.h5ad     the same cells with every nonzero value made distinct within its cell
                        (count + k/1000), so the original's binning has no random tie-breaking
  expected.json         cell ids and the original's `obsm["X_scGPT"]` for
                          - `deterministic`: wu30.h5ad with np.random.rand pinned to 0.999 (every
                            tied value gets the lowest tied bin = `scgpt embed --deterministic`)
                          - `tiefree`: wu30_tiefree.h5ad, unpinned (no ties, so no randomness)
Every cell has fewer than 1199 vocabulary genes, so the collator never subsamples.

Setup (no GPU needed):
  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch numpy tqdm anndata
  /work/venv-torch/bin/pip install --no-deps scgpt==0.2.4
  /work/venv-torch/bin/python tests/gen/embed/gen_embed_reference.py
Then rebuild the shard-set fixture from wu30.h5ad with the repository's scgpt-prep:
  target/release/scgpt-prep --input tests/data/embed/wu30.h5ad --out tests/data/embed/shards \
      --gene-col feature_name --build-vocab --deterministic --quiet
(--build-vocab: the shard vocabulary is built from the file's 470 genes in column order, so its
ids differ from the model's and 70 of its genes are not in the model vocabulary: `scgpt embed`
has to remap through the token names)
(this script does it when --prep points at a built scgpt-prep).
"""

import argparse
import contextlib
import gzip
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "tests" / "gen" / "model"))
import gen_parity as gp  # noqa: E402  (randomise, rename_keys, flat)

OUT = REPO / "tests" / "data" / "embed"
N_VOCAB_GENES = 400
N_HUMAN_ONLY = 30
N_FOREIGN = 40
N_CELLS = 30
DIMS = dict(embsize=32, nheads=4, d_hid=64, nlayers=2, n_layers_cls=3, dropout=0.2)
SEED = 20240611


def import_original():
    """`scgpt.tasks.cell_emb` with the package's optional imports replaced by stand-ins.

    - scgpt/__init__.py would import every subpackage (scanpy, torchtext, wandb, ...): `scgpt`
      is registered as a bare package holding only the original's `logger`.
    - scanpy: `embed_data` calls only `sc.read_h5ad` (and `sc.AnnData` when asked for a new
      object): anndata's own functions.
    - scgpt.tokenizer needs torchtext (gone from PyPI for current torch): a `GeneVocab` with the
      few torchtext `Vocab` methods `embed_data` calls (from_file, in, [], append_token,
      set_default_index, __call__, len), same semantics: ids in file order, specials appended.
    - scgpt.utils imports matplotlib and IPython at module level for plotting helpers;
      `load_pretrained` uses neither: empty stand-ins.
    - scgpt.model: the real model.py (+ dsbn.py, grad_reverse.py), as gen_parity.py does.
    """
    spec = importlib.util.find_spec("scgpt")
    if spec is None:
        sys.exit("scgpt is not installed: pip install --no-deps scgpt==0.2.4")
    root = spec.submodule_search_locations[0]

    def package(name, path, **attrs):
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    import anndata

    logger = logging.getLogger("scGPT")
    package("scgpt", root, logger=logger, __version__="0.2.4")
    stub("scanpy", read_h5ad=anndata.read_h5ad, AnnData=anndata.AnnData)
    stub("scanpy.get", _get_obs_rep=None, _set_obs_rep=None)
    mpl = stub("matplotlib")
    mpl.pyplot = stub("matplotlib.pyplot")
    mpl.axes = stub("matplotlib.axes", Axes=object)  # only used in annotations
    stub("IPython", get_ipython=lambda: None)

    class GeneVocab:
        def __init__(self, tokens):
            self.itos = list(tokens)
            self.stoi = {t: i for i, t in enumerate(self.itos)}
            self.default = None

        @classmethod
        def from_file(cls, path):
            with open(path) as f:
                d = json.load(f)
            return cls(t for t, _ in sorted(d.items(), key=lambda kv: kv[1]))

        def __contains__(self, t):
            return t in self.stoi

        def __getitem__(self, t):
            if t in self.stoi:
                return self.stoi[t]
            if self.default is None:
                raise RuntimeError(f"token {t} not found and default index is not set")
            return self.default

        def __len__(self):
            return len(self.itos)

        def append_token(self, t):
            self.stoi[t] = len(self.itos)
            self.itos.append(t)

        def set_default_index(self, i):
            self.default = i

        def __call__(self, tokens):
            return [self[t] for t in tokens]

    stub("scgpt.tokenizer", GeneVocab=GeneVocab)
    package("scgpt.model", os.path.join(root, "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash_attn is not installed"
        mm = importlib.import_module("scgpt.model.model")
    sys.modules["scgpt.model"].TransformerModel = mm.TransformerModel
    package("scgpt.utils", os.path.join(root, "utils"))
    util = importlib.import_module("scgpt.utils.util")
    sys.modules["scgpt.utils"].load_pretrained = util.load_pretrained
    package("scgpt.tasks", os.path.join(root, "tasks"))
    cell_emb = importlib.import_module("scgpt.tasks.cell_emb")
    return mm, cell_emb


@contextlib.contextmanager
def fixed_rand(u):
    """Pin np.random.rand, the original `_digitize`'s only source of randomness.

    digit = ceil(l - U (l - r)); U = 0.999 gives r + 1, the lowest tied bin, for any tie of up to
    50 edges (0.001 * 50 < 1). DataLoader workers are forked, so they inherit the patch.
    """
    saved = np.random.rand
    np.random.rand = lambda n: np.full(n, u)
    try:
        yield
    finally:
        np.random.rand = saved


def choose_data():
    import anndata
    import scipy.sparse as sp

    with gzip.open(REPO / "data" / "vocab_human.json.gz", "rt") as f:
        human = json.load(f)
    ens = {}
    with gzip.open(REPO / "data" / "ensembl_to_symbol.tsv.gz", "rt") as f:
        next(f)
        for line in f:
            e, s = line.rstrip("\n").split("\t")
            ens.setdefault(s, []).append(e)

    a = anndata.read_h5ad(REPO / "tests" / "data" / "wu2020_200.h5ad")
    cells = a[:N_CELLS]
    X = sp.csr_matrix(cells.X)
    names = np.array(a.var_names)
    n_cells_expr = np.asarray((X > 0).sum(axis=0)).ravel()
    order = sorted(range(len(names)), key=lambda j: (-n_cells_expr[j], names[j]))
    in_human = [j for j in order if names[j] in human and n_cells_expr[j] > 0]
    # Symbols with exactly one Ensembl id so the var index maps back unambiguously.
    vocab_cols = [j for j in in_human if len(ens.get(names[j], [])) == 1][:N_VOCAB_GENES]
    taken = set(vocab_cols)
    human_only = [j for j in in_human if j not in taken][:N_HUMAN_ONLY]
    foreign = [j for j in order if names[j] not in human and n_cells_expr[j] > 0][:N_FOREIGN]
    assert len(vocab_cols) == N_VOCAB_GENES and len(human_only) == N_HUMAN_ONLY
    assert len(foreign) == N_FOREIGN

    # The tiny vocabulary: a slice of the whole-human vocabulary, kept in its id order.
    vocab_genes = sorted((names[j] for j in vocab_cols), key=lambda g: human[g])
    tokens = vocab_genes + ["<pad>", "<cls>", "<eoc>"]

    cols = vocab_cols + human_only + foreign
    rng = np.random.RandomState(SEED)
    cols = [cols[i] for i in rng.permutation(len(cols))]
    sub = sp.csr_matrix(X[:, cols], dtype=np.float32)
    sub.sort_indices()
    symbols = [str(names[j]) for j in cols]
    index = []
    for g in symbols:
        ids = ens.get(g, [])
        index.append(ids[0] if len(ids) == 1 else g)
    return tokens, sub, symbols, index, list(cells.obs_names)


def write_h5ad(path, X, symbols, index, cell_ids):
    import anndata
    import pandas as pd

    var = pd.DataFrame({"feature_name": symbols}, index=pd.Index(index, name=None))
    obs = pd.DataFrame(index=pd.Index(cell_ids, name=None))
    obs["n_genes"] = np.diff(X.indptr).astype(np.int64)
    ad = anndata.AnnData(X=X, obs=obs, var=var)
    ad.obsm["X_dummy"] = np.zeros((X.shape[0], 2), dtype=np.float32)  # an existing obsm entry
    ad.write_h5ad(path)


def tie_free(X):
    """count + k/1000 with k a random distinct rank inside each cell: no two values of a cell
    are equal (float32 resolves 1/1000 up to 8192), and the integer part keeps the ordering."""
    Y = X.copy()
    rng = np.random.RandomState(SEED + 1)
    for i in range(Y.shape[0]):
        a, b = Y.indptr[i], Y.indptr[i + 1]
        k = rng.permutation(b - a) + 1
        Y.data[a:b] = (Y.data[a:b].astype(np.float64) + k / 1000.0).astype(np.float32)
        assert len(np.unique(Y.data[a:b])) == b - a
    return Y


def build_model(mm, ntoken, pad_id):
    torch.manual_seed(SEED)
    model = mm.TransformerModel(
        ntoken=ntoken, d_model=DIMS["embsize"], nhead=DIMS["nheads"], d_hid=DIMS["d_hid"],
        nlayers=DIMS["nlayers"], nlayers_cls=DIMS["n_layers_cls"], n_cls=1,
        vocab=gp.Vocab({"<pad>": pad_id}), dropout=DIMS["dropout"], pad_token="<pad>",
        pad_value=-2, do_mvc=True, use_fast_transformer=False,
    )
    gen = torch.Generator().manual_seed(SEED + 2)
    gp.randomise(model, gen)
    return model, gen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prep", type=Path, default=REPO / "target" / "release" / "scgpt-prep",
                    help="scgpt-prep binary to rebuild tests/data/embed/shards with")
    a = ap.parse_args()
    mm, cell_emb = import_original()
    (OUT / "model").mkdir(parents=True, exist_ok=True)

    tokens, X, symbols, index, cell_ids = choose_data()
    lengths = np.diff(X.indptr)
    print(f"{N_CELLS} cells, {X.shape[1]} genes, {X.nnz} nonzeros, {lengths.min()}..{lengths.max()} per cell")
    vocab = {t: i for i, t in enumerate(tokens)}
    (OUT / "model" / "vocab.json").write_text(json.dumps(vocab) + "\n")

    model, gen = build_model(mm, len(tokens), vocab["<pad>"])
    sd = OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith("cls_decoder."))
    sd["flag_encoder.weight"] = torch.randn(2, DIMS["embsize"], generator=gen)
    torch.save(gp.rename_keys(sd, "flash", "plain"), OUT / "model" / "best_model.pt")
    args = dict(DIMS)
    args.update({"pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51,
                 "input_emb_style": "continuous", "max_seq_len": 1200, "MVC": True,
                 "USE_GENERATIVE_TRAINING": True, "fast_transformer": True, "n_cls": 1,
                 "input_style": "binned", "lr": 0.0001, "epochs": 6, "no_cls": True})
    (OUT / "model" / "args.json").write_text(json.dumps(args, indent=1) + "\n")

    write_h5ad(OUT / "wu30.h5ad", X, symbols, index, cell_ids)
    write_h5ad(OUT / "wu30_tiefree.h5ad", tie_free(X), symbols, index, cell_ids)

    def embed(path):
        ad = cell_emb.embed_data(str(path), str(OUT / "model"), gene_col="feature_name",
                                 max_length=1200, batch_size=8, device="cpu")
        assert list(ad.obs_names) == cell_ids
        return np.asarray(ad.obsm["X_scGPT"], dtype=np.float32)

    torch.backends.mha.set_fastpath_enabled(False)  # ordinary attention, as the Rust model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fixed_rand(0.999):
            det = embed(OUT / "wu30.h5ad")
            det2 = embed(OUT / "wu30.h5ad")
        np.random.seed(1)
        rnd1 = embed(OUT / "wu30.h5ad")
        np.random.seed(2)
        tf1 = embed(OUT / "wu30_tiefree.h5ad")
        np.random.seed(3)
        tf2 = embed(OUT / "wu30_tiefree.h5ad")
    assert np.array_equal(det, det2), "the pinned draw did not reach the collator"
    assert not np.allclose(det, rnd1, atol=1e-4), "wu30 should have ties"
    assert np.allclose(tf1, tf2, atol=1e-6), "wu30_tiefree still has ties"
    print(f"pinned vs random draw: max |diff| {np.abs(det - rnd1).max():.3g} (ties matter)")

    n_in_vocab = sum(s in vocab for s in symbols)
    fixture = {
        "generator": "tests/gen/embed/gen_embed_reference.py",
        "original": "scgpt 0.2.4 scgpt.tasks.cell_emb.embed_data(gene_col='feature_name', "
                    "max_length=1200, batch_size=8, device='cpu')",
        "torch": torch.__version__,
        "n_cells": N_CELLS,
        "n_genes": X.shape[1],
        "n_genes_in_vocab": n_in_vocab,
        "embsize": DIMS["embsize"],
        "cell_ids": cell_ids,
        "deterministic": [gp.flat(torch.from_numpy(r)) for r in det],
        "tiefree": [gp.flat(torch.from_numpy(r)) for r in tf1],
    }
    (OUT / "expected.json").write_text(json.dumps(fixture) + "\n")

    if a.prep.exists():
        shards = OUT / "shards"
        shutil.rmtree(shards, ignore_errors=True)
        subprocess.run([str(a.prep), "--input", str(OUT / "wu30.h5ad"), "--out", str(shards),
                        "--gene-col", "feature_name", "--build-vocab", "--deterministic",
                        "--quiet"],
                       check=True, cwd=REPO)
        shutil.rmtree(shards / ".progress", ignore_errors=True)
        print(f"rebuilt {shards} with {a.prep}")
    else:
        print(f"{a.prep} not built: tests/data/embed/shards left as it is")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(REPO)}: {p.stat().st_size} B")


if __name__ == "__main__":
    main()
