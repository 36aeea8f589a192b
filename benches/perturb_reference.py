"""The original's perturbation fine-tuning step in PyTorch (CPU), for benches/perturb_bench.sh.

This is the 0.2.4 package's own `scgpt.model.generation_model.TransformerGenerator` (imported as
the perturbation fixture generator does, tests/gen/model/gen_perturbation.py) built as
Tutorial_Perturbation builds it (nlayers_cls=3, n_cls=1, pad_token "<pad>", pad_value 0,
pert_pad_id 0, the default decoder: no MVC, no zero probabilities, no CLS/CCE/ECS heads used)
except for size, with flash-attn off (it needs CUDA), and trained as the tutorial's `train()`
does with amp off (there is no amp on the CPU):

  model.train(); per batch of GEARS cells (x = [control value, pert flag] per gene, y = the
  perturbed cell), every screen gene a candidate (include_zero_gene "all"), max_seq_len of
  them taken for the batch, mapped to vocabulary ids;
  forward(ids, values, flags, src_key_padding_mask=all False, CLS=False, CCE=False, MVC=False,
  ECS=False) -> masked_mse_loss(mlm_output, target, masked_positions=all True)
  -> zero_grad, backward, clip_grad_norm_(1.0), Adam(lr 1e-4, eps 1e-8) step

Data: random cells of the same shapes as the bench's screen (--genes screen genes, values
log-normalised-like 0..4 with a share --zero-frac of zeros, one perturbed gene per perturbed
cell, a share --ctrl-frac of control cells with no flag), made before the timer. The tutorial
draws `torch.randperm(n_genes)[:max_seq_len]` per batch (which may drop a cell's perturbed
gene); here, as in ours, the batch's perturbed genes are always kept and the rest drawn at
random: the same [batch, max_seq_len] shapes either way. The gene selection and the slicing of
the batch (what the tutorial does inside its loop) are inside the step timing, as in ours.
Random weights: speed does not depend on them.

  python benches/perturb_reference.py --ntoken 2003 --genes 2000 --len 1536 --steps 4
"""
import argparse
import importlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/gen/model"))
from gen_parity import Vocab  # noqa: E402
from gen_perturbation import import_generation_model  # noqa: E402

PAD_VALUE = 0
PERT_PAD_ID = 0


def build(a):
    gm = import_generation_model()
    loss = importlib.import_module("scgpt.loss")
    pad = 0
    model = gm.TransformerGenerator(
        ntoken=a.ntoken, d_model=a.d, nhead=a.heads, d_hid=a.d_hid, nlayers=a.layers,
        nlayers_cls=3, n_cls=1, vocab=Vocab({"<pad>": pad}), dropout=a.dropout,
        pad_token="<pad>", pad_value=PAD_VALUE, pert_pad_id=PERT_PAD_ID,
        use_fast_transformer=False,
    )
    return model, loss


def cells(n, genes, gen, zero_frac, ctrl_frac):
    """n GEARS cells: control values x, flags, targets y, dense over the screen's genes."""
    x = torch.rand(n, genes, generator=gen) * 4.0
    x[torch.rand(n, genes, generator=gen) < zero_frac] = 0.0
    y = torch.rand(n, genes, generator=gen) * 4.0
    y[torch.rand(n, genes, generator=gen) < zero_frac] = 0.0
    flags = torch.zeros(n, genes, dtype=torch.long)
    perturbed = torch.rand(n, generator=gen) >= ctrl_frac
    which = torch.randint(0, genes, (n,), generator=gen)
    flags[perturbed, which[perturbed]] = 1
    x[~perturbed] = y[~perturbed]  # control cells are their own input
    return x, flags, y


def train(a, model, loss):
    gen = torch.Generator().manual_seed(1)
    # The screen's genes as vocabulary ids (the bench's vocabulary: specials, then the genes).
    gene_ids = torch.arange(a.ntoken - a.genes, a.ntoken)
    batches = [cells(a.batch, a.genes, gen, a.zero_frac, a.ctrl_frac) for _ in range(a.steps)]
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, eps=a.eps)
    times, losses = [], []
    for step, (x, flags, y) in enumerate(batches):
        t0 = time.perf_counter()
        # The tutorial's selection of max_seq_len genes, keeping the batch's perturbed ones.
        forced = flags.any(0).nonzero().flatten()
        rest = torch.ones(a.genes, dtype=torch.bool)
        rest[forced] = False
        rest = rest.nonzero().flatten()
        rest = rest[torch.randperm(rest.numel(), generator=gen)[: a.len - forced.numel()]]
        input_gene_ids = torch.cat([forced, rest])
        input_values = x[:, input_gene_ids]
        input_pert_flags = flags[:, input_gene_ids]
        target_values = y[:, input_gene_ids]
        mapped = gene_ids[input_gene_ids].repeat(a.batch, 1)
        src_key_padding_mask = torch.zeros_like(input_values, dtype=torch.bool)
        out = model(mapped, input_values, input_pert_flags,
                    src_key_padding_mask=src_key_padding_mask,
                    CLS=False, CCE=False, MVC=False, ECS=False)
        masked_positions = torch.ones_like(input_values, dtype=torch.bool)
        l = loss.masked_mse_loss(out["mlm_output"], target_values, masked_positions)
        model.zero_grad()
        l.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(l.item())
        print(f"step {step + 1}: {times[-1]:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr,
              flush=True)
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"mode": "train", "seconds_per_step": steady, "cells_per_s": a.batch / steady,
            "step_times": times, "losses": losses}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ntoken", type=int, required=True, help="vocabulary size (ours: the run's)")
    ap.add_argument("--genes", type=int, default=2000, help="genes of the screen")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--len", type=int, default=1536, help="genes sampled per batch (max_seq_len)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--zero-frac", type=float, default=0.3,
                    help="share of zero genes per cell (the simulated screens: ~30%%)")
    ap.add_argument("--ctrl-frac", type=float, default=0.4, help="share of control cells")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-8)
    a = ap.parse_args()
    assert a.genes >= a.len and a.ntoken > a.genes
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    logging.getLogger("scGPT").setLevel(logging.ERROR)
    model, loss = build(a)
    r = train(a, model, loss)
    r.update({"torch": torch.__version__, "threads": a.threads, "len": a.len, "batch": a.batch,
              "ntoken": a.ntoken})
    print(json.dumps(r))


if __name__ == "__main__":
    main()
