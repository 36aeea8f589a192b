#!/usr/bin/env python3
"""Checks that a model pretrained by scgpt-train loads in the original scGPT under PyTorch.

For a run directory (`<run.dir>/best_model/`: best_model.pt + args.json + vocab.json, the
original's format, written by the trainer), this script `torch.load`s the checkpoint (default
`weights_only=True`, and `mmap=True`), builds the original 0.2.4 `TransformerModel` from the
exported args.json as the original scripts do (no flash-attn: the `Wqkv.` -> `in_proj_` rename
path), asserts every key matches both ways (the one tolerated extra is `flag_encoder.weight`,
as in the released whole-human checkpoint), loads it with the original's `load_pretrained`,
checks every tensor arrived unchanged, and runs the original's forward with MVC on a batch.

  /work/venv-torch/bin/python tests/gen/engine/check_pretrain_export_in_torch.py RUN_DIR
"""
import importlib.util
import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "model"))
from gen_parity import import_original_model  # noqa: E402

spec = importlib.util.spec_from_file_location("cet", HERE.parents[1] / "model/check_export_in_torch.py")
cet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cet)


def main():
    d = Path(sys.argv[1]) / "best_model"
    mm = import_original_model()
    load_pretrained = cet.original_load_pretrained()
    args = json.loads((d / "args.json").read_text())
    vocab = json.loads((d / "vocab.json").read_text())
    sd = torch.load(d / "best_model.pt")
    assert type(sd) is OrderedDict, type(sd)
    sd_mmap = torch.load(d / "best_model.pt", mmap=True)
    assert list(sd_mmap) == list(sd)
    model = cet.build_original(mm, args, vocab)
    renamed = {k.replace("Wqkv.", "in_proj_"): v for k, v in sd.items()}
    msd = model.state_dict()
    extra = sorted(k for k, v in renamed.items() if k not in msd or msd[k].shape != v.shape)
    absent = sorted(k for k in msd if k not in renamed)
    assert extra == ["flag_encoder.weight"], f"file keys not matched: {extra}"
    assert not absent, f"model keys absent from the file: {absent}"
    load_pretrained(model, sd, strict=False, verbose=False)
    after = model.state_dict()
    for k, v in renamed.items():
        if k in after:
            assert torch.equal(after[k], v), f"{k} changed on load"
    model.eval()
    pad = vocab[args["pad_token"]]
    genes = torch.randint(0, pad, (4, 50))
    genes[:, 0] = vocab["<cls>"]
    values = torch.randint(1, 51, (4, 50)).float()
    values[:, 0] = args["pad_value"]
    with torch.no_grad():
        out = model(genes, values, genes == pad, MVC=True)
    assert torch.isfinite(out["mlm_output"]).all() and torch.isfinite(out["mvc_output"]).all()
    print(f"PASS {d}: {len(sd)} tensors, every key matched (flag_encoder.weight extra), "
          f"load_pretrained kept them bit for bit, forward + MVC finite; torch {torch.__version__}")


if __name__ == "__main__":
    main()
