#!/usr/bin/env python3
"""Perturbation fine-tuning parity fixture for crates/scgpt-engine (tests/perturbation_parity.rs).

Builds the original `scgpt.model.generation_model.TransformerGenerator` (PyPI scgpt 0.2.4) with
Tutorial_Perturbation's settings: dropout 0, `pad_value` 0, `pert_pad_id` 0, no MVC, no explicit
zero probabilities, `cell_emb_style="cls"`, `use_fast_transformer=False`; tiny dimensions
(d 32, 2 heads, d_hid 48, 2 layers, `nlayers_cls` 3, `n_cls` 1), the vocabulary of the model
fixtures (100 tokens, `<pad>` 97). Every parameter is randomised as
tests/gen/model/gen_perturbation.py does (so the `<pad>` row of the gene embedding and the
`pert_pad_id` row of `pert_encoder` are nonzero: `padding_idx` only blocks their gradients).

The dataset has 24 genes, 4 of them outside the vocabulary and mapped to `<pad>` as the tutorial
does (`gene_ids = [vocab[g] if g in vocab else vocab["<pad>"] ...]`), and unmasked
(`src_key_padding_mask` all False). One training step in train mode, as the tutorial's `train`
loop runs it with `include_zero_gene = "all"` (every gene, fewer than `max_seq_len`):

  model(mapped_input_gene_ids, input_values, input_pert_flags, src_key_padding_mask,
        CLS=False, CCE=False, MVC=False, ECS=False)
  loss = masked_mse_loss(output["mlm_output"], target_values, masked_positions=all True)

on 4 cells: `input_values` a control cell's log-normalised expression (zeros included),
`target_values` the perturbed cell's, flags 1 at 1–2 genes per row (row 3's second perturbed
gene is one of the genes outside the vocabulary). Then, with the same parameters (no optimiser
step), the original's `pred_perturb(batch_data, include_zero_gene="all", gene_ids, amp=False)`
in eval mode on 3 further control cells, with a GEARS-like `batch_data` (`x` = [B·G, 2] of
expression and flag, `pert` one name per cell).

Writes:

  tests/data/engine/perturbation_grad.pt    the state_dict before the step (a saved
                                            `TransformerGenerator`, PyTorch `in_proj_` names)
  tests/data/engine/perturbation_grad.json  the constructor arguments, the step's inputs,
                                            loss, `mlm_output` and gradients, and the
                                            `pred_perturb` inputs and output

Setup (no GPU needed; PyPI's torch wheel runs on CPU), from the repository root:
  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch numpy tqdm
  /work/venv-torch/bin/pip install --no-deps scgpt==0.2.4
  /work/venv-torch/bin/python tests/gen/engine/gen_perturbation_grad.py

The import of the original generation model, the randomisation and the `batch_data` stand-in
are tests/gen/model/gen_perturbation.py's; the loss is the original's `scgpt/loss.py`.
"""

import argparse
import importlib
import json
import logging
import sys
from collections import OrderedDict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests/gen/model"))
import gen_parity as gp  # noqa: E402
import gen_perturbation as gpert  # noqa: E402

SEED = 4300
B, G = 4, 24  # training step: cells × dataset genes
B_PRED = 3  # pred_perturb batch
OUTSIDE = [2, 9, 15, 21]  # dataset genes missing from the vocabulary (→ <pad>)
# Perturbed genes per training row (row 3's second is outside the vocabulary).
PERTURBED = [[4], [7, 12], [0], [18, 21]]
PERTURBED_PRED = [[5], [10, 19], [3]]
CTOR = dict(d_model=32, nhead=2, d_hid=48, nlayers=2, nlayers_cls=3, n_cls=1, dropout=0.0,
            pad_token="<pad>", pad_value=0, pert_pad_id=0, do_mvc=False,
            cell_emb_style="cls", explicit_zero_prob=False, use_fast_transformer=False)

GRAD_PARAMS = [
    "encoder.embedding.weight",  # the whole 100 × 32 table (rows of unused ids are 0)
    "encoder.enc_norm.weight",
    "value_encoder.linear1.weight",
    "value_encoder.linear2.weight",
    "value_encoder.norm.weight",
    "pert_encoder.weight",  # all 3 rows: row 0 (pert_pad_id) must be 0
    "transformer_encoder.layers.0.self_attn.in_proj_weight",
    "transformer_encoder.layers.1.linear2.weight",
    "decoder.coeff_decoder.fc.0.weight",
    "decoder.coeff_decoder.fc.4.weight",
    "decoder.coeff_decoder.fc.4.bias",
    "decoder.bias_decoder.fc.0.weight",
    "decoder.bias_decoder.fc.4.weight",
    "decoder.bias_decoder.fc.4.bias",
]


def expression(gen, b, g, zero_frac):
    """Log-normalised-looking values (0.5..4) with a fraction of exact zeros."""
    v = torch.rand(b, g, generator=gen) * 3.5 + 0.5
    v[torch.rand(b, g, generator=gen) < zero_frac] = 0.0
    return v


def flags_of(perturbed, g):
    f = torch.zeros(len(perturbed), g, dtype=torch.long)
    for i, genes in enumerate(perturbed):
        f[i, genes] = 1
    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/engine")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # reduction order, hence the last bits, independent of the box
    torch.backends.mha.set_fastpath_enabled(False)
    logging.getLogger("scGPT").setLevel(logging.ERROR)
    gm = gpert.import_generation_model()
    masked_mse_loss = importlib.import_module("scgpt.loss").masked_mse_loss

    torch.manual_seed(SEED)
    model = gm.TransformerGenerator(ntoken=gp.NTOKEN, vocab=gp.Vocab({"<pad>": gp.PAD_ID}),
                                    **CTOR)
    gen = torch.Generator().manual_seed(SEED + 1)
    gpert.randomise(model, gen)
    assert model.pert_encoder.padding_idx == 0 and model.encoder.embedding.padding_idx == gp.PAD_ID
    assert model.pert_encoder.weight[0].abs().sum() > 0  # randomised: the forward reads it
    sd = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())

    gene_ids = torch.randperm(gp.N_GENES, generator=gen)[:G].numpy()
    gene_ids[OUTSIDE] = gp.PAD_ID

    # --- one training step (the tutorial's train loop, include_zero_gene = "all") ---
    control = expression(gen, B, G, 0.4)
    flags = flags_of(PERTURBED, G)
    # The perturbed cells: another draw, their perturbed genes knocked down.
    target = expression(gen, B, G, 0.4)
    target[flags.bool()] = 0.0
    target[1, 12] = 0.8  # one perturbed gene still expressed
    src = torch.tensor(gene_ids, dtype=torch.long).repeat(B, 1)
    pad_mask = torch.zeros(B, G, dtype=torch.bool)
    masked_positions = torch.ones_like(control, dtype=torch.bool)

    model.train()
    model.zero_grad(set_to_none=True)
    out = model(src, control, flags, src_key_padding_mask=pad_mask,
                CLS=False, CCE=False, MVC=False, ECS=False)
    loss = masked_mse_loss(out["mlm_output"], target, masked_positions)
    loss.backward()
    params = dict(model.named_parameters())
    missing = [k for k in GRAD_PARAMS if k not in params or params[k].grad is None]
    assert not missing, missing
    grads = {k: params[k].grad for k in GRAD_PARAMS}
    assert torch.all(grads["encoder.embedding.weight"][gp.PAD_ID] == 0)
    assert torch.all(grads["pert_encoder.weight"][0] == 0)
    assert grads["pert_encoder.weight"][1].abs().sum() > 0
    # Nothing is stepped: pred_perturb sees the saved parameters.
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    print(f"train step ({B} × {G}): loss {float(loss.detach()):.6f}")

    # --- pred_perturb in eval mode (the tutorial's eval_perturb / predict) ---
    pred_values = expression(gen, B_PRED, G, 0.4)
    pred_flags = flags_of(PERTURBED_PRED, G)
    batch = gpert.Batch(pred_values, pred_flags)
    with torch.no_grad():
        pred = model.pred_perturb(batch, include_zero_gene="all", gene_ids=gene_ids, amp=False)
    assert not model.training
    with torch.no_grad():  # what it computes: the eval forward over every gene
        again = model(torch.tensor(gene_ids).repeat(B_PRED, 1), pred_values, pred_flags,
                      torch.zeros(B_PRED, G, dtype=torch.bool))["mlm_output"]
    assert torch.equal(pred, again)
    print(f"pred_perturb ({B_PRED} × {G}): mean {float(pred.mean()):.6f}")

    pt_path = a.out / "perturbation_grad.pt"
    torch.save(sd, pt_path)
    tj = gp.tensor_json
    fixture = {
        "generator": "tests/gen/engine/gen_perturbation_grad.py",
        "torch": torch.__version__,
        "scgpt": "0.2.4",
        "seed": SEED,
        "ntoken": gp.NTOKEN,
        "pad_token_id": gp.PAD_ID,
        "ctor": CTOR,
        "checkpoint": {"file": pt_path.name, "attn_naming": "pytorch", "wrap": "plain",
                       "keys": len(sd)},
        "gene_ids": [int(x) for x in gene_ids],
        "outside_vocab": OUTSIDE,
        "step": {
            "inputs": {"src": tj(src), "values": tj(control), "target": tj(target),
                       "input_pert_flags": tj(flags),
                       "src_key_padding_mask": [bool(x) for x in pad_mask.reshape(-1)]},
            "perturbed": PERTURBED,
            "mlm_output": tj(out["mlm_output"].detach()),
            "loss": float(loss.detach()),
            "grads": {k: tj(v) for k, v in grads.items()},
        },
        "pred_perturb": {
            "include_zero_gene": "all",
            "inputs": {"values": tj(pred_values), "pert_flags": tj(pred_flags)},
            "perturbed": PERTURBED_PRED,
            "output": tj(pred),
        },
    }
    json_path = a.out / "perturbation_grad.json"
    json_path.write_text(json.dumps(fixture) + "\n")
    print(f"perturbation_grad: {pt_path.stat().st_size} B checkpoint, "
          f"{json_path.stat().st_size} B json")


if __name__ == "__main__":
    sys.exit(main())
