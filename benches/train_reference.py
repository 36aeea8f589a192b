"""The original's generative pretraining step in PyTorch (CPU), for benches/train_bench.sh.

The pretraining model of the checkpoints (dev-temp, flash-attn on CUDA) cannot run on a CPU,
so this is its math in fp32 eager PyTorch on the 0.2.4 package's own modules (as the parity
fixture generator, tests/gen/model/gen_parity.py), in training mode: dropout 0.2 at the
original's places including attention, pcpt stream with out_proj, gen stream without, GEP +
GEPC on gen tokens, the cell-prompted second pass, Adam(lr 1e-4), clip_grad_norm_(1.0).
Inputs are full rows of the shapes the collator makes for gen ratio 0.5 (no padding).

  python benches/train_reference.py --d 256 --layers 4 --heads 8 --d-hid 256 --len 512 \
      --batch 16 --steps 6 --threads 2
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/gen/model"))
from gen_parity import Vocab, import_original_model  # noqa: E402


def forward(model, flag, pg, pv, gg, p_drop, cell_prompt=None):
    d = model.d_model
    pe = model.encoder(pg)
    pt = pe + model.value_encoder(pv)
    ge = model.encoder(gg)
    gt = ge + flag[1]
    if cell_prompt is not None:
        pt = torch.cat([cell_prompt[:, None, :], pt[:, 1:]], dim=1)
    B, P, _ = pt.shape
    G = gt.shape[1]
    own = torch.eye(G, dtype=torch.bool)
    gen_mask = torch.cat([torch.zeros(G, P, dtype=torch.bool), ~own], dim=1)  # True = blocked
    for layer in model.transformer_encoder.layers:
        sa = layer.self_attn
        h = sa.num_heads
        dh = d // h
        pqkv = F.linear(pt, sa.in_proj_weight, sa.in_proj_bias).reshape(B, P, 3, h, dh)
        q, k, v = (pqkv[:, :, i].transpose(1, 2) for i in range(3))
        a = F.dropout((q @ k.transpose(-1, -2) / math.sqrt(dh)).softmax(-1), p_drop, True)
        pctx = sa.out_proj((a @ v).transpose(1, 2).reshape(B, P, d))
        gqkv = F.linear(gt, sa.in_proj_weight, sa.in_proj_bias).reshape(B, G, 3, h, dh)
        gq, gk, gv = (gqkv[:, :, i].transpose(1, 2) for i in range(3))
        keys = torch.cat([k, gk], dim=2)
        vals = torch.cat([v, gv], dim=2)
        s = (gq @ keys.transpose(-1, -2) / math.sqrt(dh)).masked_fill(gen_mask, float("-inf"))
        gctx = (F.dropout(s.softmax(-1), p_drop, True) @ vals).transpose(1, 2).reshape(B, G, d)

        def post(x, att):
            x = layer.norm1(x + layer.dropout1(att))
            return layer.norm2(x + layer.dropout2(layer.linear2(layer.dropout(F.relu(layer.linear1(x))))))

        pt, gt = post(pt, pctx), post(gt, gctx)
    out = torch.cat([pt, gt], dim=1)
    preds = model.decoder(out)["pred"]
    cell = out[:, 0, :]
    mvc = model.mvc_decoder(cell, torch.cat([pe, ge], dim=1))["pred"]
    return preds[:, P:], mvc[:, P:], cell


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ntoken", type=int, default=60697)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mm = import_original_model()
    pad = a.ntoken - 3
    model = mm.TransformerModel(
        ntoken=a.ntoken, d_model=a.d, nhead=a.heads, d_hid=a.d_hid, nlayers=a.layers,
        nlayers_cls=3, n_cls=1, dropout=a.dropout, vocab=Vocab({"<pad>": pad}), pad_token="<pad>",
        pad_value=-2, do_mvc=True, use_fast_transformer=False,
    )
    flag = torch.nn.Parameter(torch.randn(2, a.d))
    model.train()
    opt = torch.optim.Adam(list(model.parameters()) + [flag], lr=1e-4)
    G = int((a.len - 1) * a.ratio)
    P = a.len - G
    times = []
    for step in range(a.steps):
        pg = torch.randint(0, pad, (a.batch, P))
        pg[:, 0] = pad + 1
        pv = torch.randint(1, 51, (a.batch, P)).float()
        pv[:, 0] = -2
        gg = torch.randint(0, pad, (a.batch, G))
        target = torch.randint(1, 51, (a.batch, G)).float()
        t0 = time.perf_counter()
        gen, mvc, cell = forward(model, flag, pg, pv, gg, a.dropout)
        loss = F.mse_loss(gen, target) + F.mse_loss(mvc, target)
        gen2, _, _ = forward(model, flag, pg, pv, gg, a.dropout, cell.detach())
        loss = loss + F.mse_loss(gen2, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        print(f"step {step}: {times[-1]:.3f} s, loss {loss.item():.3f}", file=sys.stderr)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    print(json.dumps({"seconds_per_step": steady, "cells_per_s": a.batch / steady, "steps": a.steps,
                      "torch": torch.__version__, "threads": a.threads, "P": P, "G": G}))


if __name__ == "__main__":
    main()
