#!/usr/bin/env python3
"""Integration fine-tuning parity fixture for crates/scgpt-engine (tests/integration_parity.rs).

Builds the original `scgpt.model.model.TransformerModel` (PyPI scgpt 0.2.4) with the flags of
Tutorial_Integration: GEPC (`do_mvc=True`), DAB (`do_dab=True`), batch labels concatenated into
the decoders (`use_batch_labels=True`, 3 batch labels), DSBN (`domain_spec_batchnorm=True`,
affine-free), `ecs_threshold=0.8`, `explicit_zero_prob=True`, continuous input, `cell_emb_style
= "cls"`, dropout 0. Every parameter (and every DSBN running buffer) is randomised exactly as
tests/gen/model/gen_parity.py does. Two training-mode steps from the same parameters, each
on a single-domain minibatch as the tutorial's `SubsetsBatchSampler` gives them (DSBN
normalises with the batch statistics of `bns[batch_labels[0]]`):

  "a"  6 cells of domain 1, tokenised as `tokenize_and_pad_batch(include_zero_gene=True)`:
       `<cls>` (value 0) + the same 16 genes in every row, zero-expressed genes with bin 0,
       so no padding (the tutorial's own shape);
  "b"  5 cells of domain 2, rows of 9..17 tokens padded with `<pad>`/−2.

Each row masks exactly floor(n·0.4) of its n non-pad positions (`<cls>` included) to −1, as
`random_mask_value(mask_ratio=0.4, mask_value=-1, pad_value=-2)` does; the masks are drawn here
and saved. The loss is the tutorial's training loop, term by term:

  masked_mse_loss(mlm_output) + criterion_neg_log_bernoulli(mlm_zero_probs)
  + masked_mse_loss(mvc_output) + criterion_neg_log_bernoulli(mvc_zero_probs)
  + 10 · loss_ecs + 1.0 · CrossEntropyLoss(dab_output, batch_labels)

with `model(src, values, src_key_padding_mask, batch_labels=batch_labels, CLS=False, CCE=False,
MVC=True, ECS=True, do_sample=False)`. The gradients are zeroed between the two steps; no
optimiser step is taken, so both start from the saved parameters (the DSBN running statistics
of domains 1 and 2 are updated by the steps, domain 0's are not: all three are saved).

Writes:

  tests/data/engine/integration_grad.pt         the state_dict before the steps, a plain dict
                                                with the flash-attn `self_attn.Wqkv.*` names
  tests/data/engine/integration_grad.args.json  a pretrained model's arguments (the test sets
                                                the tutorial's flags on the config it reads)
  tests/data/engine/integration_grad.json       per step: inputs, each term, the total loss
                                                and gradients; the DSBN running statistics

Setup (no GPU needed; PyPI's torch wheel runs on CPU), from the repository root:
  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch numpy tqdm
  /work/venv-torch/bin/pip install --no-deps scgpt==0.2.4
  /work/venv-torch/bin/python tests/gen/engine/gen_integration_grad.py

The import of the original model, the parameter randomisation, the JSON tensor format and the
checkpoint renaming are taken from gen_parity.py; the two loss functions are the original's
`scgpt/loss.py`.
"""

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
GEN_PARITY = REPO / "tests/gen/model/gen_parity.py"

# The vocabulary of the model fixtures: 97 genes, <pad> 97, <cls> 98, <eoc> 99.
N_GENES = 97
PAD_ID, CLS_ID = 97, 98
NTOKEN = 100
PAD_VALUE = -2
MASK_VALUE = -1
CLS_VALUE = 0.0  # tokenize_and_pad_batch gives <cls> the value 0 in fine-tuning
MASK_RATIO = 0.4
ECS_THRES = 0.8
ECS_WEIGHT = 10.0  # the tutorial's `10 * output_dict["loss_ecs"]`
DAB_WEIGHT = 1.0

DIMS = dict(embsize=32, nheads=2, d_hid=32, nlayers=2, n_layers_cls=3)
NUM_BATCH_LABELS = 3
N_HVG = 16  # the genes every include_zero_gene row carries
SEED = 4100

# name, domain, row lengths incl. <cls> (N_HVG + 1: <cls> + all the genes, in `hvg` order;
# shorter rows take a random subset, as include_zero_gene=False rows would)
STEPS = [("a", 1, [N_HVG + 1] * 6), ("b", 2, [17, 12, 17, 9, 14])]

GRAD_PARAMS = [
    "encoder.embedding.weight",  # the whole 100 × 32 table (rows of unused ids are 0)
    "encoder.enc_norm.weight",
    "value_encoder.linear1.weight",
    "batch_encoder.embedding.weight",
    "batch_encoder.enc_norm.weight",
    "transformer_encoder.layers.0.self_attn.in_proj_weight",  # step "a" only (size)
    "transformer_encoder.layers.1.linear2.weight",
    "decoder.fc.0.weight",  # step "a" only
    "decoder.fc.4.weight",
    "decoder.zero_logit.2.weight",
    "decoder.zero_logit.4.weight",
    "decoder.zero_logit.4.bias",
    "mvc_decoder.gene2query.weight",
    "mvc_decoder.W.weight",
    "mvc_decoder.W_zero_logit.weight",  # step "a" only
    "grad_reverse_discriminator._decoder.0.weight",
    "grad_reverse_discriminator._decoder.2.weight",
    "grad_reverse_discriminator.out_layer.weight",
    "grad_reverse_discriminator.out_layer.bias",
]
# The largest tensors are saved for the first step only, to keep the JSON small.
FIRST_STEP_ONLY = {
    "transformer_encoder.layers.0.self_attn.in_proj_weight",
    "decoder.fc.0.weight",
    "mvc_decoder.W_zero_logit.weight",
}


def load_gen_parity():
    spec = importlib.util.spec_from_file_location("gen_parity", GEN_PARITY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_step(gen, hvg, lengths):
    """src, target values, masked input values and the mask, as the tutorial collates them."""
    B, L = len(lengths), max(lengths)
    src = torch.full((B, L), PAD_ID, dtype=torch.long)
    target = torch.full((B, L), float(PAD_VALUE))
    for i, n in enumerate(lengths):
        genes = hvg if n == N_HVG + 1 else hvg[torch.randperm(N_HVG, generator=gen)[: n - 1]]
        src[i, 0] = CLS_ID
        src[i, 1:n] = genes
        target[i, 0] = CLS_VALUE
        bins = torch.randint(1, 51, (n - 1,), generator=gen).float()
        zero = torch.rand(n - 1, generator=gen) < 0.35  # unexpressed genes keep bin 0
        target[i, 1:n] = torch.where(zero, torch.zeros_like(bins), bins)
    values = target.clone()
    for i, n in enumerate(lengths):
        # random_mask_value: exactly int(n · ratio) of the row's non-pad positions.
        pick = torch.randperm(n, generator=gen)[: int(n * MASK_RATIO)]
        values[i, pick] = float(MASK_VALUE)
    return src, target, values, src.eq(PAD_ID), values.eq(MASK_VALUE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/engine")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # reduction order, hence the last bits, independent of the box
    torch.backends.mha.set_fastpath_enabled(False)
    gp = load_gen_parity()
    assert (gp.N_GENES, gp.PAD_ID, gp.CLS_ID, gp.NTOKEN) == (N_GENES, PAD_ID, CLS_ID, NTOKEN)
    mm = gp.import_original_model()  # registers the `scgpt` namespace package
    loss_mod = importlib.import_module("scgpt.loss")
    masked_mse_loss = loss_mod.masked_mse_loss
    criterion_neg_log_bernoulli = loss_mod.criterion_neg_log_bernoulli

    torch.manual_seed(SEED)
    model = mm.TransformerModel(
        ntoken=NTOKEN, d_model=DIMS["embsize"], nhead=DIMS["nheads"], d_hid=DIMS["d_hid"],
        nlayers=DIMS["nlayers"], nlayers_cls=DIMS["n_layers_cls"], n_cls=1,
        vocab=gp.Vocab({"<pad>": PAD_ID}), dropout=0.0, pad_token="<pad>", pad_value=PAD_VALUE,
        do_mvc=True, do_dab=True, use_batch_labels=True, num_batch_labels=NUM_BATCH_LABELS,
        domain_spec_batchnorm=True, input_emb_style="continuous", cell_emb_style="cls",
        ecs_threshold=ECS_THRES, explicit_zero_prob=True, use_fast_transformer=False,
    )
    gen = torch.Generator().manual_seed(SEED + 1)
    gp.randomise(model, gen)
    sd = gp.rename_keys(model.state_dict(), "flash", "plain")  # before the steps touch the BN stats
    model.train()  # dropout 0: deterministic; DSBN normalises with the batch statistics
    criterion_dab = torch.nn.CrossEntropyLoss()
    params = dict(model.named_parameters())

    hvg = torch.randperm(N_GENES, generator=gen)[:N_HVG]
    steps = []
    for name, domain, lengths in STEPS:
        src, target, values, pad, masked = make_step(gen, hvg, lengths)
        batch_labels = torch.full((len(lengths),), domain, dtype=torch.long)
        model.zero_grad(set_to_none=True)
        out = model(src, values, src_key_padding_mask=pad, batch_labels=batch_labels,
                    CLS=False, CCE=False, MVC=True, ECS=True, do_sample=False)
        terms = {
            "gep": masked_mse_loss(out["mlm_output"], target, masked),
            "gep_zero": criterion_neg_log_bernoulli(out["mlm_zero_probs"], target, masked),
            "gepc": masked_mse_loss(out["mvc_output"], target, masked),
            "gepc_zero": criterion_neg_log_bernoulli(out["mvc_zero_probs"], target, masked),
            "ecs": out["loss_ecs"],
            "dar": criterion_dab(out["dab_output"], batch_labels),
        }
        loss = (terms["gep"] + terms["gep_zero"] + terms["gepc"] + terms["gepc_zero"]
                + ECS_WEIGHT * terms["ecs"] + DAB_WEIGHT * terms["dar"])
        loss.backward()
        missing = [k for k in GRAD_PARAMS if k not in params or params[k].grad is None]
        assert not missing, missing
        steps.append({
            "name": name,
            "domain": domain,
            "inputs": {"src": gp.tensor_json(src), "values": gp.tensor_json(values),
                       "target": gp.tensor_json(target),
                       "src_key_padding_mask": [bool(x) for x in pad.reshape(-1)],
                       "masked": [bool(x) for x in masked.reshape(-1)],
                       "batch_labels": [int(x) for x in batch_labels]},
            "masked_count": int(masked.sum()),
            "terms": {k: float(v.detach()) for k, v in terms.items()},
            "loss": float(loss.detach()),
            "grads": {k: gp.tensor_json(params[k].grad) for k in GRAD_PARAMS
                      if not steps or k not in FIRST_STEP_ONLY},
        })
        print(f"step {name} (domain {domain}): loss {float(loss.detach()):.6f}, "
              + ", ".join(f"{k} {float(v.detach()):.5f}" for k, v in terms.items()))

    bns = {}  # domain 0 saw no step: its statistics are the checkpoint's
    for domain in range(NUM_BATCH_LABELS):
        bn = model.dsbn.bns[domain]
        bns[f"dsbn.bns.{domain}.running_mean"] = gp.tensor_json(bn.running_mean)
        bns[f"dsbn.bns.{domain}.running_var"] = gp.tensor_json(bn.running_var)

    pt_path = a.out / "integration_grad.pt"
    torch.save(sd, pt_path)

    # A pretrained model's args.json (the tutorial builds the model from its own flags: the
    # test sets do_dab, use_batch_labels, num_batch_labels, DSBN, ecs_threshold,
    # explicit_zero_prob and dropout 0 on the config it reads).
    args = dict(DIMS)
    args.update({"dropout": 0.2, "MVC": True, "input_emb_style": "continuous",
                 "pad_value": PAD_VALUE, "mask_value": MASK_VALUE, "n_bins": 51,
                 "pad_token": "<pad>", "fast_transformer": True, "lr": 1e-4, "epochs": 6,
                 "save_dir": "/unused/by/the/model"})
    (a.out / "integration_grad.args.json").write_text(json.dumps(args, indent=1) + "\n")

    fixture = {
        "generator": "tests/gen/engine/gen_integration_grad.py",
        "torch": torch.__version__,
        "scgpt": "0.2.4",
        "seed": SEED,
        "ntoken": NTOKEN,
        "pad_token_id": PAD_ID,
        "cls_token_id": CLS_ID,
        "num_batch_labels": NUM_BATCH_LABELS,
        "mask_ratio": MASK_RATIO,
        "ecs_threshold": ECS_THRES,
        "ecs_weight": ECS_WEIGHT,
        "dab_weight": DAB_WEIGHT,
        "checkpoint": {"file": pt_path.name, "attn_naming": "flash", "wrap": "plain",
                       "keys": len(sd)},
        "steps": steps,
        "running_stats_after": bns,
    }
    json_path = a.out / "integration_grad.json"
    json_path.write_text(json.dumps(fixture) + "\n")
    print(f"integration_grad: {pt_path.stat().st_size} B checkpoint, "
          f"{json_path.stat().st_size} B json")


if __name__ == "__main__":
    sys.exit(main())
