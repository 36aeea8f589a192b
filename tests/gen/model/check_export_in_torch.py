#!/usr/bin/env python3
"""Checks `scgpt_model::checkpoint::export_original` against the original scGPT under PyTorch.

For every exported directory (`best_model.pt`, `args.json`, `vocab.json`) written by the Rust
test `export_for_the_torch_check` (models initialised and randomised in Rust, so their weights
never came from PyTorch), this script:

  1. `torch.load`s `best_model.pt` with torch's default `weights_only=True` loader (and again
     with `mmap=True`, which needs torch's storage alignment) and checks it is an OrderedDict
     of CPU tensors;
  2. builds the original 0.2.4 `TransformerModel` from `args.json` + `vocab.json` the way the
     original scripts do (`use_fast_transformer=args["fast_transformer"]`, which falls back to
     PyTorch attention because flash-attn is not installed: the no-flash rename path);
  3. asserts that every key matches, with the original's renaming (`Wqkv.` -> `in_proj_`, as
     `load_pretrained` does without flash-attn): every file key is a model key of the same
     shape and every model key is in the file. The only tolerated extra is
     `flag_encoder.weight` of a generative model (the released whole-human checkpoint has it
     too; 0.2.4's model has no slot for it);
  4. loads it through the original's `scgpt.utils.load_pretrained` (its source, executed
     verbatim: `scgpt.utils` itself imports matplotlib/IPython, which the model does not
     need) and checks every tensor arrived unchanged;
  5. runs the original forward (eval, PyTorch's fast path off) on the recorded inputs and
     compares with the outputs the Rust model produced: |torch - rust| <= 1e-4 * max(1, |rust|);
     per-token outputs at padded positions are implementation-defined and skipped (as in the
     parity tests).

Usage (needs the venv of gen_parity.py and cargo):
  /work/venv-torch/bin/python tests/gen/model/check_export_in_torch.py            # runs cargo
  SCGPT_EXPORT_CHECK_DIR=/tmp/x cargo test -p scgpt-model --test export export_for_the_torch_check
  /work/venv-torch/bin/python tests/gen/model/check_export_in_torch.py --dir /tmp/x
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
from gen_parity import Vocab, import_original_model  # noqa: E402

TOL = 1e-4
PER_TOKEN = {"transformer_output", "mlm_output", "mlm_zero_probs", "generate"}


def original_load_pretrained():
    """`scgpt.utils.util.load_pretrained` from the installed 0.2.4 source, executed as is."""
    import logging
    from typing import List, Mapping, Optional

    root = Path(sys.modules["scgpt"].__path__[0])  # registered by import_original_model
    src = (root / "utils" / "util.py").read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "load_pretrained")
    ns = {"torch": torch, "Mapping": Mapping, "Optional": Optional, "List": List,
          "logger": logging.getLogger("scGPT")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(root / "utils/util.py"), "exec"), ns)
    return ns["load_pretrained"]


def build_original(mm, args, vocab):
    """The original model from args.json, as the fine-tuning scripts/tutorials build it."""
    dsbn = args.get("DSBN", args.get("domain_spec_batchnorm", False))
    kw = dict(
        ntoken=len(vocab), d_model=args["embsize"], nhead=args["nheads"], d_hid=args["d_hid"],
        nlayers=args["nlayers"], nlayers_cls=args["n_layers_cls"], n_cls=args["n_cls"],
        vocab=Vocab(vocab), dropout=args["dropout"], pad_token=args["pad_token"],
        pad_value=args["pad_value"], do_mvc=args["MVC"], do_dab=args["DAB"],
        use_batch_labels=args["use_batch_labels"], num_batch_labels=args.get("num_batch_labels"),
        domain_spec_batchnorm=dsbn, input_emb_style=args["input_emb_style"],
        n_input_bins=args.get("n_input_bins"), cell_emb_style=args["cell_emb_style"],
        mvc_decoder_style=args["mvc_decoder_style"], ecs_threshold=args["ecs_thres"],
        explicit_zero_prob=args["explicit_zero_prob"],
        use_fast_transformer=args["fast_transformer"],
        fast_transformer_backend=args["fast_transformer_backend"], pre_norm=args["pre_norm"],
    )
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash-attn is not installed, using pytorch ..."
        model = mm.TransformerModel(**kw)
    assert model.use_fast_transformer is False, "expected the no-flash fallback"
    return model


def as_tensor(v, dtype=torch.float32):
    return torch.tensor(np.array(v["data"]), dtype=dtype).reshape(v["shape"])


def compare(name, got, want, pad_rows):
    if name.startswith("loss_"):  # a 0-dim tensor in PyTorch, [1] in Rust
        got = got.reshape(1)
    assert list(got.shape) == list(want["shape"]), f"{name}: {list(got.shape)} vs {want['shape']}"
    got = got.detach().float().reshape(-1).numpy()
    w = np.array(want["data"], dtype=np.float32)
    assert got.size == w.size, f"{name}: {got.size} values, Rust has {w.size}"
    keep = np.ones(w.size, dtype=bool)
    if name in PER_TOKEN and pad_rows is not None:
        per = w.size // pad_rows.size
        keep = ~np.repeat(pad_rows, per)
    err = np.abs(got[keep] - w[keep]) / np.maximum(1.0, np.abs(w[keep]))
    worst = float(err.max()) if err.size else 0.0
    ok = bool(np.isfinite(err).all() and worst <= TOL)
    return ok, worst, int(keep.sum())


def check_one(mm, load_pretrained, root, expected_path):
    exp = json.loads(expected_path.read_text())
    d = root / exp["export_dir"]
    args = json.loads((d / "args.json").read_text())
    vocab = json.loads((d / "vocab.json").read_text())
    assert len(vocab) == exp["ntoken"] and vocab[args["pad_token"]] == exp["pad_token_id"]

    sd = torch.load(d / "best_model.pt")  # torch 2.15 default: weights_only=True
    assert type(sd) is OrderedDict, type(sd)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in sd.values())
    # mmap loading needs the storages aligned as torch aligns them.
    sd_mmap = torch.load(d / "best_model.pt", mmap=True)
    assert list(sd_mmap) == list(sd) and all(torch.equal(sd_mmap[k], v) for k, v in sd.items())

    model = build_original(mm, args, vocab)
    renamed = {k.replace("Wqkv.", "in_proj_"): v for k, v in sd.items()}
    model_sd = model.state_dict()
    extra = sorted(k for k, v in renamed.items()
                   if k not in model_sd or model_sd[k].shape != v.shape)
    absent = sorted(k for k in model_sd if k not in renamed)
    allowed_extra = ["flag_encoder.weight"] if args.get("USE_GENERATIVE_TRAINING") else []
    assert extra == allowed_extra, f"file keys not matched: {extra}"
    assert not absent, f"model keys absent from the file: {absent}"
    for k, v in renamed.items():
        if k in model_sd:
            assert model_sd[k].dtype == v.dtype, (k, model_sd[k].dtype, v.dtype)

    load_pretrained(model, sd, strict=False, verbose=False)
    after = model.state_dict()
    for k, v in renamed.items():
        if k in after:
            assert torch.equal(after[k], v), f"{k} did not load"

    model.eval()
    inp = exp["inputs"]
    src = as_tensor(inp["src"], torch.long)
    values = as_tensor(inp["values"])
    mask = torch.tensor(inp["src_key_padding_mask"], dtype=torch.bool).reshape(src.shape)
    labels = inp.get("batch_labels")
    batch_labels = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    with torch.no_grad():
        out = model(src, values, mask, batch_labels=batch_labels, **exp["flags"])
        out["transformer_output"] = model._encode(src, values, mask, batch_labels)
        out["generate"] = model.generate(out["cell_emb"], src, values, mask,
                                         batch_labels=batch_labels)
    pad_rows = mask.reshape(-1).numpy()
    results, all_ok = [], True
    for name, want in sorted(exp["outputs"].items()):
        assert name in out, f"{name}: not produced by the original"
        ok, worst, n = compare(name, out[name], want, pad_rows)
        all_ok &= ok
        results.append(f"{name} {'ok' if ok else 'FAIL'} ({n} values, worst rel err {worst:.1e})")
    matched = len(renamed) - len(extra)
    print(f"{exp['variant']}: {len(sd)} keys in best_model.pt, {matched} matched, "
          f"extra {extra}; " + "; ".join(results))
    return all_ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, help="output of export_for_the_torch_check "
                    "(default: run it with cargo into a temporary directory)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)
    root = a.dir
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="scgpt-export-check-"))
        env = dict(os.environ, SCGPT_EXPORT_CHECK_DIR=str(root))
        subprocess.run(["cargo", "test", "-q", "-p", "scgpt-model", "--test", "export",
                        "export_for_the_torch_check"], cwd=REPO, env=env, check=True)
    mm = import_original_model()
    load_pretrained = original_load_pretrained()
    files = sorted(root.glob("*.expected.json"))
    assert files, f"no *.expected.json in {root}"
    ok = True
    for f in files:
        ok &= check_one(mm, load_pretrained, root, f)
    print(f"torch {torch.__version__}: {'PASS' if ok else 'FAIL'} ({len(files)} exports)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
