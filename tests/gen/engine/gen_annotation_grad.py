#!/usr/bin/env python3
"""Annotation fine-tuning parity fixture for crates/scgpt-engine (tests/annotation_parity.rs).

Builds the original `scgpt.model.model.TransformerModel` (PyPI scgpt 0.2.4) with its CLS head
(the Tutorial_Annotation setup: continuous input, `cell_emb_style="cls"`, no MVC/DAB/DSBN),
randomises every parameter exactly as tests/gen/model/gen_parity.py does, and runs one
training-mode step on a padded batch of 6 cells tokenised the way `tokenize_and_pad_batch`
does for fine-tuning (`<cls>` first with value 0, the genes with bins 1..50, then `<pad>` with
value −2; `src_key_padding_mask = src == <pad>`). Dropout is 0, so train mode is deterministic.
The loss is the tutorial's `nn.CrossEntropyLoss()(output["cls_output"], celltype_labels)`.

Writes:

  tests/data/engine/annotation_grad.pt         the state_dict, a plain dict with the flash-attn
                                               `self_attn.Wqkv.*` names of a real checkpoint
                                               (`cls_decoder.*` included: the test needs it)
  tests/data/engine/annotation_grad.args.json  the model arguments, spelled as args.json does
  tests/data/engine/annotation_grad.json       inputs, loss, logits and gradients

Setup (no GPU needed; PyPI's torch wheel runs on CPU), from the repository root:
  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch numpy tqdm
  /work/venv-torch/bin/pip install --no-deps scgpt==0.2.4
  /work/venv-torch/bin/python tests/gen/engine/gen_annotation_grad.py

The import of the original model (only `scgpt/model/model.py`, not the package's heavy
`__init__`), the parameter randomisation, the JSON tensor format and the checkpoint renaming
are taken from gen_parity.py, so the two scripts cannot drift apart.
"""

import argparse
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
CLS_VALUE = 0.0  # tokenize_and_pad_batch gives <cls> the value 0 in fine-tuning

DIMS = dict(embsize=32, nheads=2, d_hid=32, nlayers=2, n_layers_cls=3)
N_CLS = 5
LENGTHS = [12, 9, 12, 5, 8, 10]  # incl. <cls>; four of the six cells are padded
SEED = 4000

GRAD_PARAMS = [
    "cls_decoder._decoder.0.weight",
    "cls_decoder._decoder.0.bias",
    "cls_decoder._decoder.2.weight",
    "cls_decoder._decoder.2.bias",
    "cls_decoder._decoder.3.weight",
    "cls_decoder._decoder.3.bias",
    "cls_decoder._decoder.5.weight",
    "cls_decoder._decoder.5.bias",
    "cls_decoder.out_layer.weight",
    "cls_decoder.out_layer.bias",
    "transformer_encoder.layers.1.linear2.weight",
    "transformer_encoder.layers.0.self_attn.in_proj_weight",
    "encoder.embedding.weight",  # the whole 100 × 32 table (rows of unused ids are 0)
    "value_encoder.linear1.weight",
]


def load_gen_parity():
    spec = importlib.util.spec_from_file_location("gen_parity", GEN_PARITY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/engine")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # reduction order, hence the last bits, independent of the box
    torch.backends.mha.set_fastpath_enabled(False)
    gp = load_gen_parity()
    assert (gp.N_GENES, gp.PAD_ID, gp.CLS_ID, gp.NTOKEN) == (N_GENES, PAD_ID, CLS_ID, NTOKEN)
    mm = gp.import_original_model()

    torch.manual_seed(SEED)
    model = mm.TransformerModel(
        ntoken=NTOKEN, d_model=DIMS["embsize"], nhead=DIMS["nheads"], d_hid=DIMS["d_hid"],
        nlayers=DIMS["nlayers"], nlayers_cls=DIMS["n_layers_cls"], n_cls=N_CLS,
        vocab=gp.Vocab({"<pad>": PAD_ID}), dropout=0.0, pad_token="<pad>", pad_value=PAD_VALUE,
        do_mvc=False, do_dab=False, use_batch_labels=False, domain_spec_batchnorm=False,
        input_emb_style="continuous", cell_emb_style="cls", explicit_zero_prob=False,
        use_fast_transformer=False,
    )
    gen = torch.Generator().manual_seed(SEED + 1)
    gp.randomise(model, gen)
    model.train()  # dropout 0: deterministic

    B, L = len(LENGTHS), max(LENGTHS)
    src = torch.full((B, L), PAD_ID, dtype=torch.long)
    values = torch.full((B, L), float(PAD_VALUE))
    for i, n in enumerate(LENGTHS):
        src[i, 0] = CLS_ID
        src[i, 1:n] = torch.randperm(N_GENES, generator=gen)[: n - 1]
        values[i, 0] = CLS_VALUE
        values[i, 1:n] = torch.randint(1, 51, (n - 1,), generator=gen).float()
    mask = src.eq(PAD_ID)
    labels = torch.tensor([0, 3, 1, 4, 3, 2], dtype=torch.long)

    out = model(src, values, src_key_padding_mask=mask, batch_labels=None,
                CLS=True, CCE=False, MVC=False, ECS=False)
    logits = out["cls_output"]
    loss = torch.nn.CrossEntropyLoss()(logits, labels)
    loss.backward()
    params = dict(model.named_parameters())
    missing = [k for k in GRAD_PARAMS if k not in params or params[k].grad is None]
    assert not missing, missing
    grads = {k: gp.tensor_json(params[k].grad) for k in GRAD_PARAMS}

    sd = model.state_dict()
    pt_path = a.out / "annotation_grad.pt"
    torch.save(gp.rename_keys(sd, "flash", "plain"), pt_path)

    # A pretrained model's args.json: no n_cls (the fine-tuning run sets it from its labels);
    # the test sets n_cls = 5 and dropout = 0 on the config it reads.
    args = dict(DIMS)
    args.update({"dropout": 0.2, "MVC": False, "input_emb_style": "continuous",
                 "pad_value": PAD_VALUE, "mask_value": -1, "n_bins": 51, "pad_token": "<pad>",
                 "fast_transformer": True, "lr": 1e-4, "epochs": 6,
                 "save_dir": "/unused/by/the/model"})
    (a.out / "annotation_grad.args.json").write_text(json.dumps(args, indent=1) + "\n")

    fixture = {
        "generator": "tests/gen/engine/gen_annotation_grad.py",
        "torch": torch.__version__,
        "scgpt": "0.2.4",
        "seed": SEED,
        "ntoken": NTOKEN,
        "pad_token_id": PAD_ID,
        "cls_token_id": CLS_ID,
        "n_cls": N_CLS,
        "checkpoint": {"file": pt_path.name, "attn_naming": "flash", "wrap": "plain",
                       "keys": len(sd)},
        "inputs": {"src": gp.tensor_json(src), "values": gp.tensor_json(values),
                   "src_key_padding_mask": [bool(x) for x in mask.reshape(-1)],
                   "labels": [int(x) for x in labels]},
        "loss": float(loss.detach()),
        "logits": gp.tensor_json(logits),
        "grads": grads,
    }
    json_path = a.out / "annotation_grad.json"
    json_path.write_text(json.dumps(fixture) + "\n")
    print(f"annotation_grad: loss {float(loss.detach()):.6f}, {pt_path.stat().st_size} B checkpoint, "
          f"{json_path.stat().st_size} B json")


if __name__ == "__main__":
    sys.exit(main())
