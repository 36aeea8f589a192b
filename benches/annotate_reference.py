"""The original's annotation fine-tuning step and classifier inference in PyTorch (CPU), for
benches/annotate_bench.sh.

This is the 0.2.4 package's own `scgpt.model.model.TransformerModel` (imported as the parity
fixture generator does, tests/gen/model/gen_parity.py) built as Tutorial_Annotation builds it
(CLS head with nlayers_cls layers, no MVC/DAB/ECS/DSBN, input_emb_style "continuous",
cell_emb_style "cls", pad_value -2) except for size, with flash-attn off (it needs CUDA), and
run as the tutorial runs it with amp off (there is no amp on the CPU):

  train    model.train(); forward(CLS=True) -> CrossEntropyLoss on cls_output -> zero_grad,
           backward, clip_grad_norm_(1.0), Adam(lr 1e-4, eps 1e-4) step
  predict  model.eval(); torch.no_grad(); forward(CLS=True) in batches -> softmax

Inputs are full rows: `<cls>` (value 0) then random gene ids with bin values 1..50, no padding,
so the shapes equal what our collator makes from cells with more expressed genes than the
token budget. Random weights: speed does not depend on them.

  python benches/annotate_reference.py train --steps 8 --batch 32 --len 512 --threads 2
  python benches/annotate_reference.py predict --cells 2000 --batch 64 --len 512 --threads 2
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/gen/model"))
from gen_parity import Vocab, import_original_model  # noqa: E402


def build(a):
    mm = import_original_model()
    pad = a.ntoken - 3
    model = mm.TransformerModel(
        ntoken=a.ntoken, d_model=a.d, nhead=a.heads, d_hid=a.d_hid, nlayers=a.layers,
        nlayers_cls=a.layers_cls, n_cls=a.n_cls, vocab=Vocab({"<pad>": pad}), dropout=a.dropout,
        pad_token="<pad>", pad_value=-2, do_mvc=False, do_dab=False, use_batch_labels=False,
        domain_spec_batchnorm=False, input_emb_style="continuous", n_input_bins=51,
        cell_emb_style="cls", mvc_decoder_style="inner product", ecs_threshold=0.0,
        explicit_zero_prob=False, use_fast_transformer=False, pre_norm=False,
    )
    return model, pad


def rows(n, length, pad, gen):
    """n cells of `length` tokens: <cls> (value 0) first, then gene ids with bins 1..50."""
    ids = torch.randint(0, pad, (n, length), generator=gen)
    ids[:, 0] = pad + 1  # <cls>
    values = torch.randint(1, 51, (n, length), generator=gen).float()
    values[:, 0] = 0.0
    mask = torch.zeros(n, length, dtype=torch.bool)  # the tutorial's ids.eq(pad_id): no padding
    return ids, values, mask


def train(a, model, pad):
    gen = torch.Generator().manual_seed(1)
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, eps=a.eps)
    times = []
    for step in range(a.steps):
        ids, values, mask = rows(a.batch, a.len, pad, gen)
        labels = torch.randint(0, a.n_cls, (a.batch,), generator=gen)
        t0 = time.perf_counter()
        out = model(ids, values, src_key_padding_mask=mask, batch_labels=None,
                    CLS=True, CCE=False, MVC=False, ECS=False, do_sample=False)
        loss = criterion(out["cls_output"], labels)
        model.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=False)
        opt.step()
        times.append(time.perf_counter() - t0)
        print(f"step {step + 1}: {times[-1]:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {"mode": "train", "seconds_per_step": steady, "cells_per_s": a.batch / steady,
            "step_times": times}


def predict(a, model, pad):
    gen = torch.Generator().manual_seed(2)
    ids, values, mask = rows(a.cells, a.len, pad, gen)
    model.eval()
    probs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, a.cells, a.batch):
            out = model(ids[s:s + a.batch], values[s:s + a.batch],
                        src_key_padding_mask=mask[s:s + a.batch], batch_labels=None, CLS=True)
            probs.append(F.softmax(out["cls_output"], dim=-1))
    secs = time.perf_counter() - t0
    probs = torch.cat(probs)
    assert probs.shape == (a.cells, a.n_cls)
    return {"mode": "predict", "seconds": secs, "cells": a.cells, "cells_per_s": a.cells / secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "predict"])
    ap.add_argument("--ntoken", type=int, default=60697)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--layers-cls", type=int, default=3)
    ap.add_argument("--n-cls", type=int, default=8)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, pad = build(a)
    r = train(a, model, pad) if a.mode == "train" else predict(a, model, pad)
    r.update({"torch": torch.__version__, "threads": a.threads, "len": a.len, "batch": a.batch})
    print(json.dumps(r))


if __name__ == "__main__":
    main()
