"""The original's integration fine-tuning step in PyTorch (CPU), for benches/integrate_bench.sh.

This is the 0.2.4 package's own `scgpt.model.model.TransformerModel` (imported as the parity
fixture generator does, tests/gen/model/gen_parity.py) built as Tutorial_Integration builds it
(do_mvc=True (GEPC), do_dab=True, use_batch_labels=True, num_batch_labels=N,
domain_spec_batchnorm=True (DSBN), explicit_zero_prob=True, ecs_threshold=0.8,
input_emb_style "continuous", cell_emb_style "cls", mvc_decoder_style "inner product",
pad_value -2; the default CLS head is built but never used, as in the tutorial) except for size,
with flash-attn off (it needs CUDA), and trained as the tutorial's `train()` does with amp off
(there is no amp on the CPU):

  model.train(); forward(batch_labels=..., MVC=True, ECS=True) ->
    masked_mse_loss(mlm_output) + criterion_neg_log_bernoulli(mlm_zero_probs)
    + masked_mse_loss(mvc_output) + criterion_neg_log_bernoulli(mvc_zero_probs)
    + 10 * loss_ecs + 1.0 * CrossEntropyLoss(dab_output, batch_labels)
  -> zero_grad, backward, clip_grad_norm_(1.0), Adam(lr 1e-4, eps 1e-4) step

Inputs are what the tutorial's `tokenize_and_pad_batch(include_zero_gene=True)` +
`random_mask_value(mask_ratio=0.4)` make: every row `<cls>` (value 0) then the same `--len - 1`
genes (all genes of the data, in one order) with bins 0..50, a share --zero-frac of them 0 (the
bench's simulated cells express ~300 of their 512 genes; only the loss values, not the speed,
depend on it), no padding, and exactly int(len * 0.4) positions of each row (`<cls>` included)
set to the mask value -1; the targets are the unmasked values. One batch label per minibatch
(SubsetsBatchSampler with per-batch subsets; DSBN reads batch_labels[0]), cycling over the N
batches step by step. Random weights: speed does not depend on them.

  python benches/integrate_reference.py --steps 6 --batch 64 --len 513 --batches 2 --threads 2
"""
import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/gen/model"))
from gen_parity import Vocab, import_original_model  # noqa: E402

MASK_VALUE = -1.0
PAD_VALUE = -2


def build(a):
    mm = import_original_model()
    # Registered by import_original_model as a namespace package: scgpt/loss.py needs only torch.
    loss = importlib.import_module("scgpt.loss")
    pad = a.ntoken - 3
    model = mm.TransformerModel(
        ntoken=a.ntoken, d_model=a.d, nhead=a.heads, d_hid=a.d_hid, nlayers=a.layers,
        vocab=Vocab({"<pad>": pad}), dropout=a.dropout, pad_token="<pad>", pad_value=PAD_VALUE,
        do_mvc=True, do_dab=True, use_batch_labels=True, num_batch_labels=a.batches,
        domain_spec_batchnorm=True, input_emb_style="continuous", n_input_bins=51,
        cell_emb_style="cls", mvc_decoder_style="inner product", ecs_threshold=0.8,
        explicit_zero_prob=True, use_fast_transformer=False, pre_norm=False,
    )
    return model, pad, loss


def rows(n, genes, gen, mask_ratio, zero_frac):
    """n cells over the same gene row: <cls> (value 0) then every gene, a share `zero_frac` of
    them 0 and the rest bins 1..50, and the exact-count mask of random_mask_value."""
    length = genes.numel()
    ids = genes.unsqueeze(0).repeat(n, 1)
    target = torch.randint(1, 51, (n, length), generator=gen).float()
    target[torch.rand(n, length, generator=gen) < zero_frac] = 0.0
    target[:, 0] = 0.0
    values = target.clone()
    n_mask = int(length * mask_ratio)
    for r in range(n):
        values[r, torch.randperm(length, generator=gen)[:n_mask]] = MASK_VALUE
    pad_mask = ids.eq(-1)  # the tutorial's ids.eq(pad_id): no padding, all False
    return ids, values, target, pad_mask


def train(a, model, pad, loss):
    gen = torch.Generator().manual_seed(1)
    # The data's genes: len - 1 distinct ids of the vocabulary, <cls> first.
    genes = torch.cat([torch.tensor([pad + 1]), torch.randperm(pad, generator=gen)[: a.len - 1]])
    model.train()
    criterion_dab = torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, eps=a.eps)
    times, losses = [], []
    for step in range(a.steps):
        ids, values, target, pad_mask = rows(a.batch, genes, gen, a.mask_ratio, a.zero_frac)
        batch_labels = torch.full((a.batch,), step % a.batches, dtype=torch.long)
        t0 = time.perf_counter()
        out = model(ids, values, src_key_padding_mask=pad_mask, batch_labels=batch_labels,
                    CLS=False, CCE=False, MVC=True, ECS=True, do_sample=False)
        masked = values.eq(MASK_VALUE)
        l = loss.masked_mse_loss(out["mlm_output"], target, masked)
        l = l + loss.criterion_neg_log_bernoulli(out["mlm_zero_probs"], target, masked)
        l = l + loss.masked_mse_loss(out["mvc_output"], target, masked)
        l = l + loss.criterion_neg_log_bernoulli(out["mvc_zero_probs"], target, masked)
        l = l + 10 * out["loss_ecs"]
        l = l + a.dab_weight * criterion_dab(out["dab_output"], batch_labels)
        model.zero_grad()
        l.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=False)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(l.item())
        print(f"step {step + 1}: {times[-1]:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {"mode": "train", "seconds_per_step": steady, "cells_per_s": a.batch / steady,
            "step_times": times, "losses": losses}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ntoken", type=int, default=60697)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--len", type=int, default=513, help="<cls> + the data's genes")
    ap.add_argument("--batches", type=int, default=2, help="batch labels (num_batch_labels)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--zero-frac", type=float, default=0.4,
                    help="share of zero genes per cell (the bench's data: ~300 of 512 expressed)")
    ap.add_argument("--mask-ratio", type=float, default=0.4)
    ap.add_argument("--dab-weight", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, pad, loss = build(a)
    r = train(a, model, pad, loss)
    r.update({"torch": torch.__version__, "threads": a.threads, "len": a.len, "batch": a.batch})
    print(json.dumps(r))


if __name__ == "__main__":
    main()
