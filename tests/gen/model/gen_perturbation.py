#!/usr/bin/env python3
"""Parity fixtures for the perturbation model (`scgpt_model::perturbation`), produced by the
original `scgpt.model.generation_model.TransformerGenerator` (PyPI scgpt 0.2.4).

Same venv and conventions as gen_parity.py (tiny sizes, every parameter randomised with fixed
seeds, eval mode, PyTorch's attention fast path off). Writes, per variant:

  tests/data/model/<name>.pt    the generator's state_dict (a saved fine-tuned model)
  tests/data/model/<name>.json  constructor arguments, inputs and the original's outputs

Variants:
  perturbation       the tutorial's settings (pert_pad_id 0, pad_value 0, no MVC, no zero
                     probabilities; genes missing from the vocabulary mapped to <pad> and left
                     unmasked), PyTorch `in_proj_` names; outputs of `forward`, of
                     `pred_perturb` ("all" and "batch-wise"), and of `forward` again after the
                     tutorial's `load_param_prefixs` load of `continuous.pt` (a pretrained
                     TransformerModel in the whole-human layout)
  perturbation_zero  explicit zero probabilities, decoder_activation "Softplus", adaptive
                     bias, MVC, w-pool, CLS with 4 classes, pert_pad_id 2 (constructor
                     default) at padded positions, flash `Wqkv` names under "model_state_dict".
                     With explicit_zero_prob the original samples `mlm_output` in eval mode, so
                     the deterministic parts are recorded: decoder pred, zero probabilities,
                     MVC pred, CLS, ECS.

Usage: /work/venv-torch/bin/python tests/gen/model/gen_perturbation.py
"""

import ast
import json
import logging
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gen_parity as gp  # noqa: E402

OUT = gp.REPO / "tests/data/model"
DIMS = dict(d_model=32, nhead=4, d_hid=48, nlayers=2, nlayers_cls=3)


def import_generation_model():
    """`scgpt.model.generation_model` without executing the package `__init__`s: it needs
    `scgpt.logger` and `scgpt.utils.map_raw_id_to_vocab_id` (whose module imports matplotlib
    and IPython), so those two are provided, the latter from its source, verbatim."""
    gp.import_original_model()  # registers the scgpt and scgpt.model namespaces
    scgpt = sys.modules["scgpt"]
    scgpt.logger = logging.getLogger("scGPT")
    root = Path(scgpt.__path__[0])
    src = (root / "utils" / "util.py").read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "map_raw_id_to_vocab_id")
    utils = types.ModuleType("scgpt.utils")
    utils.__dict__.update(np=np, torch=torch, Union=__import__("typing").Union)
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(root / "utils/util.py"), "exec"),
         utils.__dict__)
    sys.modules["scgpt.utils"] = utils
    scgpt.utils = utils
    import importlib
    return importlib.import_module("scgpt.model.generation_model")


def randomise(model, gen):
    gp.randomise(model, gen)
    # Inputs are log-normalised expression (0..~4): value-encoder biases on that scale make
    # each unit switch on at a different value (gen_parity uses ±300 for bins up to 512).
    with torch.no_grad():
        b = model.value_encoder.linear1.bias
        b.copy_(torch.empty(b.shape).uniform_(-3.0, 3.0, generator=gen))


class Batch:
    """What `pred_perturb` reads from a GEARS batch: `x` [B*G, 2] and `pert`."""

    def __init__(self, values, flags):
        self.x = torch.stack([values.reshape(-1), flags.reshape(-1).float()], dim=1)
        self.pert = ["p"] * values.shape[0]

    def to(self, device):
        return self


def tutorial_variant(gm):
    name = "perturbation"
    ctor = dict(DIMS, n_cls=1, dropout=0.2, pad_token="<pad>", pad_value=0, pert_pad_id=0)
    torch.manual_seed(5000)
    model = gm.TransformerGenerator(ntoken=gp.NTOKEN, vocab=gp.Vocab({"<pad>": gp.PAD_ID}),
                                    use_fast_transformer=False, **ctor)
    gen = torch.Generator().manual_seed(5001)
    randomise(model, gen)
    model.eval()

    # 14 dataset genes: 11 in the vocabulary, 3 missing (mapped to <pad>, not masked).
    B, G = 3, 14
    gene_ids = torch.randperm(gp.N_GENES, generator=gen)[:G].numpy()
    gene_ids[[3, 8, 12]] = gp.PAD_ID
    values = torch.rand(B, G, generator=gen) * 3.5 + 0.5
    values[torch.rand(B, G, generator=gen) < 0.4] = 0.0
    values[:, [5, 11]] = 0.0  # dropped by batch-wise selection
    flags = torch.zeros(B, G, dtype=torch.long)
    flags[0, 2] = 1
    flags[1, [4, 9]] = 1
    flags[2, 5] = 1  # perturbed gene not expressed in any cell: dropped batch-wise
    src = torch.tensor(gene_ids, dtype=torch.long).repeat(B, 1)
    mask = torch.zeros(B, G, dtype=torch.bool)

    with torch.no_grad():
        out = model(src, values, flags, mask)
        enc = model._encode(src, values, flags, mask)
        pred_all = model.pred_perturb(Batch(values, flags), "all", gene_ids, amp=False)
        pred_bw = model.pred_perturb(Batch(values, flags), "batch-wise", gene_ids, amp=False)
    sd = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    torch.save(sd, OUT / f"{name}.pt")

    # The tutorial's pretrained load (flash-attn absent here, so the Wqkv names are renamed the
    # way load_pretrained does before the prefix filter; with flash-attn they match as is).
    pretrained = torch.load(OUT / "continuous.pt")
    pretrained = {k.replace("Wqkv.", "in_proj_"): v for k, v in pretrained.items()}
    prefixes = ["encoder", "value_encoder", "transformer_encoder"]
    model_dict = model.state_dict()
    picked = {k: v for k, v in pretrained.items() if any(k.startswith(p) for p in prefixes)}
    model_dict.update(picked)
    model.load_state_dict(model_dict)
    with torch.no_grad():
        out2 = model(src, values, flags, mask)

    tj = gp.tensor_json
    fixture = {
        "generator": "tests/gen/model/gen_perturbation.py (tutorial_variant)",
        "torch": torch.__version__, "scgpt": "0.2.4", "ntoken": gp.NTOKEN,
        "pad_token_id": gp.PAD_ID, "ctor": ctor,
        "checkpoint": {"file": f"{name}.pt", "keys": len(sd)},
        "pretrained": {"file": "continuous.pt", "prefixes": prefixes, "loaded": sorted(picked)},
        "flags": {"CLS": False, "CCE": False, "MVC": False, "ECS": False},
        "inputs": {"src": tj(src), "values": tj(values), "input_pert_flags": tj(flags),
                   "src_key_padding_mask": [bool(x) for x in mask.reshape(-1)],
                   "gene_ids": [int(x) for x in gene_ids]},
        "outputs": {"transformer_output": tj(enc), "mlm_output": tj(out["mlm_output"]),
                    "cell_emb": tj(model._get_cell_emb_from_layer(enc, values)),
                    "pred_perturb_all": tj(pred_all), "pred_perturb_batch_wise": tj(pred_bw),
                    "pretrained_mlm_output": tj(out2["mlm_output"])},
    }
    (OUT / f"{name}.json").write_text(json.dumps(fixture) + "\n")
    print(f"{name}: {(OUT / f'{name}.pt').stat().st_size} B checkpoint, "
          f"{(OUT / f'{name}.json').stat().st_size} B outputs")


def zero_variant(gm):
    name = "perturbation_zero"
    ctor = dict(DIMS, n_cls=4, dropout=0.2, pad_token="<pad>", pad_value=0, pert_pad_id=2,
                do_mvc=True, cell_emb_style="w-pool", decoder_activation="Softplus",
                decoder_adaptive_bias=True, explicit_zero_prob=True, ecs_threshold=0.3)
    torch.manual_seed(6000)
    model = gm.TransformerGenerator(ntoken=gp.NTOKEN, vocab=gp.Vocab({"<pad>": gp.PAD_ID}),
                                    use_fast_transformer=False, **ctor)
    gen = torch.Generator().manual_seed(6001)
    randomise(model, gen)
    model.eval()

    B, L, lengths = 3, 10, [10, 7, 5]
    src = torch.full((B, L), gp.PAD_ID, dtype=torch.long)
    values = torch.zeros(B, L)
    flags = torch.full((B, L), 2, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randperm(gp.N_GENES, generator=gen)[:n]
        v = torch.rand(n, generator=gen) * 3.5 + 0.5
        v[torch.rand(n, generator=gen) < 0.3] = 0.0
        v[0] = 1.25  # every cell has a nonzero value (adaptive bias divides by the count)
        values[i, :n] = v
        flags[i, :n] = 0
        flags[i, 1] = 1
    mask = src.eq(gp.PAD_ID)
    run = dict(CLS=True, CCE=False, MVC=True, ECS=True)

    with torch.no_grad():
        out = model(src, values, flags, mask, **run)  # mlm/mvc outputs are samples here
        enc = model._encode(src, values, flags, mask)
        dec = model.decoder(enc, values)
        cell = model._get_cell_emb_from_layer(enc, values)
        mvc = model.mvc_decoder(cell, model.cur_gene_token_embs)
    sd = OrderedDict((k.replace("self_attn.in_proj_", "self_attn.Wqkv."), v.detach().clone())
                     for k, v in model.state_dict().items())
    torch.save({"model_state_dict": sd, "epoch": 7}, OUT / f"{name}.pt")

    tj = gp.tensor_json
    fixture = {
        "generator": "tests/gen/model/gen_perturbation.py (zero_variant)",
        "torch": torch.__version__, "scgpt": "0.2.4", "ntoken": gp.NTOKEN,
        "pad_token_id": gp.PAD_ID, "ctor": ctor,
        "checkpoint": {"file": f"{name}.pt", "keys": len(sd)},
        "flags": run,
        "inputs": {"src": tj(src), "values": tj(values), "input_pert_flags": tj(flags),
                   "src_key_padding_mask": [bool(x) for x in mask.reshape(-1)]},
        "outputs": {"transformer_output": tj(enc), "mlm_pred": tj(dec["pred"]),
                    "mlm_zero_probs": tj(out["mlm_zero_probs"]), "cell_emb": tj(cell),
                    "cls_output": tj(out["cls_output"]), "mvc_pred": tj(mvc["pred"]),
                    "mvc_zero_probs": tj(out["mvc_zero_probs"]),
                    "loss_ecs": float(out["loss_ecs"])},
    }
    assert torch.equal(dec["zero_probs"], out["mlm_zero_probs"])
    (OUT / f"{name}.json").write_text(json.dumps(fixture) + "\n")
    print(f"{name}: {(OUT / f'{name}.pt').stat().st_size} B checkpoint, "
          f"{(OUT / f'{name}.json').stat().st_size} B outputs")


def main():
    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)
    logging.getLogger("scGPT").setLevel(logging.ERROR)  # "Auto set do_sample ..."
    gm = import_generation_model()
    tutorial_variant(gm)
    zero_variant(gm)


if __name__ == "__main__":
    main()
