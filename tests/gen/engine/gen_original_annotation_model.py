#!/usr/bin/env python3
"""An ORIGINAL scGPT fine-tuned annotation model and its predictions, for `scgpt predict`.

Fixture of crates/scgpt-cli/tests/predict_original.rs: proves that the output folder of the
original's Tutorial_Annotation loads into `scgpt predict` as it is and gives the original model's
class probabilities.

Builds the original `scgpt.model.model.TransformerModel` (PyPI scgpt 0.2.4) the way
Tutorial_Annotation builds it for fine-tuning (continuous input, `cell_emb_style="cls"`, CLS head
with `nlayers_cls=3`, no MVC/DAB/DSBN/batch labels), tiny (d 32, 2 heads, d_hid 32, 2 layers,
n_cls 4), over a vocabulary of 60 real gene symbols + `<pad>`, `<cls>`, `<eoc>`; every parameter
randomised as tests/gen/model/gen_parity.py does. Writes

  tests/data/predict/original_model/
    best_model.pt   the fine-tuned state_dict as a plain dict, with the flash-attn 1.x names
                    (`self_attn.Wqkv.*`) that `use_fast_transformer=True` gives a real run, and
                    the `cls_decoder.*` head (4 outputs); no `mvc_decoder` (MVC off)
    args.json       the PRETRAINED model's args.json (the fine-tuning reads its dimensions from
                    it): whole-human style keys at the tiny size, no `n_cls`
    vocab.json      the vocabulary (the tutorial copies the pretrained vocab.json)
    id2type.json    the tutorial's `id2type = dict(enumerate(celltype.cat.categories))`, as
                    `json.dump` writes it (string keys "0".."3")
  tests/data/predict/query.h5ad
                    12 cells x 46 genes (CSR float32, var index = gene symbols, obs `celltype`):
                    44 vocabulary genes in shuffled column order and 2 real symbols the
                    vocabulary lacks. Within each cell the nonzero vocabulary values are distinct,
                    so the original's binning has no ties (no random tie-break); 2..44 expressed
                    vocabulary genes per cell (< max_seq_len, nothing subsampled). Cells with
                    integer counts < 4096, one with counts up to ~9000, one with non-integer
                    (log-normalised) values, one expressing every vocabulary gene (the original
                    `binning`'s no-zero branch), one with just 2 genes.
  tests/data/predict/expected.json
                    the original model's softmax(cls_output) per cell (eval mode), the class
                    order, the argmax labels, and the token ids / binned values per cell.

How the expected values are computed: the Tutorial_Annotation test path, with the ORIGINAL
functions where they can run without their heavy imports. `binning` and `_digitize` are taken
from the installed scgpt/preprocess.py, and `tokenize_batch`, `pad_batch`,
`tokenize_and_pad_batch` from scgpt/tokenizer/gene_tokenizer.py, by compiling just those
function definitions out of the files (the modules import scanpy / torchtext). So:
  - genes filtered to the vocabulary (`adata[:, id_in_vocab >= 0]`), in column order;
  - each cell binned with `binning(row, 51)` (what `Preprocessor(binning=51)` does per row);
    run twice with different numpy seeds and required equal: no ties reached the random draw;
  - `tokenize_and_pad_batch(binned, gene_ids, max_len=3001, vocab, "<pad>", -2,
    append_cls=True, include_zero_gene=False)`: `<cls>` first with value 0, nonzero genes,
    every cell padded to the longest with `<pad>` / -2;
  - `model(ids, values, src_key_padding_mask=ids.eq(pad_id), batch_labels=None, CLS=True,
    CCE=False, MVC=False, ECS=False)` in eval mode on a model rebuilt from the written
    best_model.pt (flash names mapped back, strict load), softmax over classes.
The tutorial normalises (normalize_total 1e4, log1p) before binning and `scgpt predict` bins the
file's values directly; binning is per-cell rank based, and the script asserts that both give the
same bins for this query. It also asserts that each cell alone (no padding) gives the same
probabilities as the padded batch (< 1e-6).

Known differences of the real tutorial's output folder from this one (predict needs the files
named as here): the notebook ends with `torch.save(best_model.state_dict(), save_dir /
"model.pt")` (not best_model.pt), copies only vocab.json (args.json stays in the pretrained
folder), and never writes id2type to disk.

Setup (no GPU needed), from the repository root:
  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch numpy tqdm anndata
  /work/venv-torch/bin/pip install --no-deps scgpt==0.2.4
  /work/venv-torch/bin/python tests/gen/engine/gen_original_annotation_model.py
"""

import argparse
import ast
import importlib.util
import json
import logging
import sys
import typing
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[3]
GEN_PARITY = REPO / "tests/gen/model/gen_parity.py"
EMBED_VOCAB = REPO / "tests/data/embed/model/vocab.json"

DIMS = dict(embsize=32, nheads=2, d_hid=32, nlayers=2, n_layers_cls=3)
N_CLS = 4
CELLTYPES = ["B cell", "CD14+ Monocyte", "CD4+ T cell", "NK cell"]  # cat.categories order
PAD_TOKEN, PAD_VALUE = "<pad>", -2
N_BINS = 51
MAX_SEQ_LEN = 3001  # Tutorial_Annotation's max_seq_len
N_VOCAB_GENES = 60
N_QUERY_VOCAB_GENES = 44
SEED = 7100
# Expressed vocabulary genes per cell (the 44 one expresses every vocabulary gene of the query).
N_EXPRESSED = [9, 2, 17, 31, 5, 44, 12, 23, 38, 3, 27, 14]
LARGE_CELL, FLOAT_CELL = 3, 7


def load_gen_parity():
    spec = importlib.util.spec_from_file_location("gen_parity", GEN_PARITY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def original_functions(path, names, namespace):
    """Compile just the named top-level functions of an original source file."""
    tree = ast.parse(Path(path).read_text())
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(f.name for f in found) == sorted(names), (path, [f.name for f in found])
    module = ast.Module(body=found, type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)
    return [namespace[n] for n in names]


class Vocab(dict):
    """What the original's model and pad_batch read from a torchtext vocab: vocab[token]."""


def choose_vocab():
    embed = json.loads(EMBED_VOCAB.read_text())
    genes = [t for t, _ in sorted(embed.items(), key=lambda kv: kv[1]) if not t.startswith("<")]
    picked = genes[::6][:N_VOCAB_GENES]  # 60 real symbols, in whole-human vocabulary order
    unknown = [genes[1], genes[7]]  # real symbols the tiny vocabulary lacks
    assert not set(unknown) & set(picked)
    tokens = picked + ["<pad>", "<cls>", "<eoc>"]
    return {t: i for i, t in enumerate(tokens)}, picked, unknown


def make_query(rng, vocab_genes, unknown):
    """Counts with distinct nonzero vocabulary values within each cell."""
    query_vocab = list(rng.permutation(vocab_genes)[:N_QUERY_VOCAB_GENES])
    columns = query_vocab[:]
    columns.insert(11, unknown[0])
    columns.insert(30, unknown[1])
    n_cells = len(N_EXPRESSED)
    X = np.zeros((n_cells, len(columns)), dtype=np.float32)
    vocab_cols = [j for j, g in enumerate(columns) if g not in unknown]
    unknown_cols = [j for j, g in enumerate(columns) if g in unknown]
    for i, n in enumerate(N_EXPRESSED):
        cols = rng.permutation(vocab_cols)[:n]
        if i == LARGE_CELL:
            vals = rng.choice(np.arange(1, 9000), size=n, replace=False).astype(np.float32)
        elif i == FLOAT_CELL:
            raw = rng.choice(np.arange(1, 400), size=n, replace=False)
            vals = np.log1p(raw / raw.sum() * 1e4).astype(np.float32)
        else:
            vals = rng.choice(np.arange(1, 120), size=n, replace=False).astype(np.float32)
        assert len(np.unique(vals)) == n
        X[i, cols] = vals
        # The unknown genes: expressed in most cells, sometimes tying a vocabulary value.
        for j in unknown_cols:
            if rng.random() < 0.7:
                X[i, j] = vals[0] if rng.random() < 0.5 else float(rng.integers(1, 50))
    labels = [CELLTYPES[int(k)] for k in rng.integers(0, N_CLS, size=n_cells)]
    return X, columns, labels


def tutorial_normalise(X):
    """Preprocessor(normalize_total=1e4, log1p=True) on the vocabulary-filtered matrix (float32)."""
    counts = X.sum(axis=1, keepdims=True)
    return np.log1p(X / counts * np.float32(1e4)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/predict")
    a = ap.parse_args()
    model_dir = a.out / "original_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)

    scgpt_root = Path(importlib.util.find_spec("scgpt").submodule_search_locations[0])
    gp = load_gen_parity()
    mm = gp.import_original_model()
    ns = dict(np=np, torch=torch, logger=logging.getLogger("scGPT"), Vocab=Vocab,
              **{k: getattr(typing, k) for k in ["Dict", "List", "Optional", "Tuple", "Union"]})
    binning, digitize = original_functions(scgpt_root / "preprocess.py", ["binning", "_digitize"], ns)
    (tokenize_and_pad_batch,) = original_functions(
        scgpt_root / "tokenizer/gene_tokenizer.py",
        ["tokenize_batch", "pad_batch", "tokenize_and_pad_batch"], ns)[2:]

    vocab_map, vocab_genes, unknown = choose_vocab()
    vocab = Vocab(vocab_map)
    rng = np.random.default_rng(SEED)
    X, columns, labels = make_query(rng, vocab_genes, unknown)

    # ---- the fine-tuned model, as the tutorial builds it ----
    torch.manual_seed(SEED)
    kwargs = dict(
        ntoken=len(vocab), d_model=DIMS["embsize"], nhead=DIMS["nheads"], d_hid=DIMS["d_hid"],
        nlayers=DIMS["nlayers"], nlayers_cls=DIMS["n_layers_cls"], n_cls=N_CLS, vocab=vocab,
        dropout=0.0, pad_token=PAD_TOKEN, pad_value=PAD_VALUE, do_mvc=False, do_dab=False,
        use_batch_labels=False, num_batch_labels=1, domain_spec_batchnorm=False,
        input_emb_style="continuous", n_input_bins=N_BINS, cell_emb_style="cls",
        mvc_decoder_style="inner product", ecs_threshold=0.0, explicit_zero_prob=False,
        use_fast_transformer=False, pre_norm=False,
    )
    model = mm.TransformerModel(**kwargs)
    gen = torch.Generator().manual_seed(SEED + 1)
    gp.randomise(model, gen)
    # Logits of a few units, so the probabilities are not all 0/1 and the test sees every class.
    with torch.no_grad():
        model.cls_decoder.out_layer.weight.mul_(4.0)
    sd = model.state_dict()
    assert any(k.startswith("cls_decoder.out_layer") for k in sd)
    assert not any(k.startswith("mvc_decoder") for k in sd)
    ckpt = gp.rename_keys(sd, "flash", "plain")
    assert any(".self_attn.Wqkv.weight" in k for k in ckpt)
    torch.save(ckpt, model_dir / "best_model.pt")

    # The pretrained model's args.json (whole-human keys, tiny dims): no n_cls, no
    # cell_emb_style; its max_seq_len (1200) is pretraining's, the tutorial uses 3001.
    args = {
        "data_source": "/unused/cellxgene/scb_strict/human", "save_dir": "/unused/save",
        "load_model": None, "n_hvg": None, "valid_size_or_ratio": 0.003, "grad_accu_steps": 1,
        "pad_token": PAD_TOKEN, "input_style": "binned", "input_emb_style": "continuous",
        "n_bins": N_BINS, "max_seq_len": 1200, "training_tasks": "both",
        "mask_ratio": [0.25, 0.5, 0.75], "trunc_by_sample": True, "vocab_path": "/unused/vocab.json",
        "rank": 0, "batch_size": 32, "eval_batch_size": 64, "epochs": 6, "lr": 0.0001,
        "scheduler_interval": 100, "scheduler_factor": 0.99, "warmup_ratio_or_step": 10000.0,
        "no_cls": True, "no_cce": True, "fp16": True, "fast_transformer": True,
        "nlayers": DIMS["nlayers"], "nheads": DIMS["nheads"], "embsize": DIMS["embsize"],
        "d_hid": DIMS["d_hid"], "dropout": 0.2, "n_layers_cls": DIMS["n_layers_cls"],
        "log_interval": 9000, "save_interval": 27000, "mask_value": -1, "pad_value": PAD_VALUE,
        "USE_CLS": False, "USE_CCE": False, "MVC": True, "USE_GENERATIVE_TRAINING": True,
        "world_size": 16, "distributed": True, "local_rank": 0, "gpu": 0,
    }
    assert "n_cls" not in args
    (model_dir / "args.json").write_text(json.dumps(args, indent=4))
    (model_dir / "vocab.json").write_text(json.dumps(vocab_map))
    id2type = dict(enumerate(CELLTYPES))
    with open(model_dir / "id2type.json", "w") as f:
        json.dump(id2type, f)

    # ---- the query h5ad ----
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    cell_ids = [f"cell{i:02d}" for i in range(X.shape[0])]
    obs = pd.DataFrame({"celltype": pd.Categorical(labels, categories=CELLTYPES)},
                       index=cell_ids)
    var = pd.DataFrame(index=pd.Index(columns, name="gene_name"))
    ad = anndata.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
    ad.write_h5ad(a.out / "query.h5ad")
    # Read back what the file holds (float32 CSR, no explicit zeros).
    back = anndata.read_h5ad(a.out / "query.h5ad")
    assert back.X.dtype == np.float32 and back.X.nnz == np.count_nonzero(X)
    Xq = back.X.toarray()
    assert np.array_equal(Xq, X)

    # ---- the tutorial's test path ----
    in_vocab = [j for j, g in enumerate(columns) if g in vocab]  # adata[:, id_in_vocab >= 0]
    genes = [columns[j] for j in in_vocab]
    gene_ids = np.array([vocab[g] for g in genes], dtype=int)
    counts = Xq[:, in_vocab]

    def bin_all(M, seed):
        np.random.seed(seed)
        return np.stack([binning(row.copy(), N_BINS) for row in M]).astype(np.int64)

    binned = bin_all(counts, 0)
    assert np.array_equal(binned, bin_all(counts, 12345)), "ties reached the random tie-break"
    assert np.array_equal(binned, bin_all(tutorial_normalise(counts), 0)), \
        "normalize_total + log1p changed the bins"
    assert np.array_equal(binned > 0, counts > 0)
    for i, n in enumerate(N_EXPRESSED):
        nz = binned[i][binned[i] > 0]
        assert len(nz) == n and len(np.unique(nz)) == n, (i, nz)  # distinct values, distinct bins
    assert (counts[N_EXPRESSED.index(N_QUERY_VOCAB_GENES)] > 0).all()

    batch = tokenize_and_pad_batch(binned.astype(np.float32), gene_ids, max_len=MAX_SEQ_LEN,
                                   vocab=vocab, pad_token=PAD_TOKEN, pad_value=PAD_VALUE,
                                   append_cls=True, include_zero_gene=False)
    ids, values = batch["genes"], batch["values"]
    assert ids.shape[1] == max(N_EXPRESSED) + 1  # nothing subsampled, padded to the longest
    assert (ids[:, 0] == vocab["<cls>"]).all() and (values[:, 0] == 0).all()

    # The fine-tuned model as a user would load it: a fresh model, the written checkpoint.
    fresh = mm.TransformerModel(**kwargs)
    loaded = torch.load(model_dir / "best_model.pt", map_location="cpu")
    loaded = OrderedDict((k.replace("self_attn.Wqkv.", "self_attn.in_proj_"), v)
                         for k, v in loaded.items())
    fresh.load_state_dict(loaded, strict=True)
    fresh.eval()

    def forward(i, v):
        with torch.no_grad():
            out = fresh(i, v, src_key_padding_mask=i.eq(vocab[PAD_TOKEN]), batch_labels=None,
                        CLS=True, CCE=False, MVC=False, ECS=False)
        return out["cls_output"]

    logits = forward(ids, values)
    probs = torch.softmax(logits, dim=1)
    lengths = [n + 1 for n in N_EXPRESSED]
    for i, n in enumerate(lengths):
        alone = torch.softmax(forward(ids[i : i + 1, :n], values[i : i + 1, :n]), dim=1)
        assert (alone - probs[i]).abs().max() < 1e-6, (i, alone, probs[i])
    argmax = probs.argmax(1).tolist()
    assert len(set(argmax)) >= 2, argmax
    assert probs.max() < 0.999 and probs.min() > 1e-4, probs

    tokens = []
    for i, n in enumerate(lengths):
        assert (ids[i, n:] == vocab[PAD_TOKEN]).all()
        tokens.append({"ids": [int(x) for x in ids[i, :n]],
                       "values": [float(x) for x in values[i, :n]]})
    expected = {
        "generator": "tests/gen/engine/gen_original_annotation_model.py",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scgpt": "0.2.4",
        "seed": SEED,
        "classes": [id2type[k] for k in range(N_CLS)],
        "cell_ids": cell_ids,
        "probabilities": [gp.flat(r) for r in probs],
        "logits": [gp.flat(r) for r in logits],
        "labels": [id2type[k] for k in argmax],
        "tokens": tokens,
    }
    (a.out / "expected.json").write_text(json.dumps(expected) + "\n")
    sizes = {p.name: p.stat().st_size for p in [model_dir / "best_model.pt", a.out / "query.h5ad",
                                                 a.out / "expected.json"]}
    print(f"predict/original_model: argmax {argmax}, max p {float(probs.max()):.4f}, "
          f"min p {float(probs.min()):.2e}; sizes {sizes}")


if __name__ == "__main__":
    sys.exit(main())
