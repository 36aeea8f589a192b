#!/usr/bin/env python3
"""Parity fixtures for crates/scgpt-model, produced by the original scGPT model code.

Builds the original `scgpt.model.model.TransformerModel` (PyPI scgpt 0.2.4) at a tiny size with
fixed seeds, randomises every parameter (so that no weight is left at a symmetric default),
runs it in eval mode on a small padded batch and writes, per variant:

  tests/data/model/<name>.pt         the state_dict, wrapped/renamed like a real checkpoint
  tests/data/model/<name>.args.json  the model arguments, spelled the way args.json spells them
  tests/data/model/<name>.json       inputs and the original's outputs

Setup (no GPU needed; PyPI's torch wheel runs on CPU):
  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch numpy tqdm
  /work/venv-torch/bin/pip install --no-deps scgpt==0.2.4
  /work/venv-torch/bin/python tests/gen/model/gen_parity.py

Only `scgpt/model/model.py` (+ dsbn.py, grad_reverse.py) is imported: the package's top-level
`__init__` pulls optional dependencies (scanpy, torchtext, ...) that the model does not need, so
the two parent packages are registered as empty namespace modules instead of being executed.

Attention fast path: PyTorch's fused inference path (nested tensors) returns 0 at padded query
positions, the slow path returns ordinary attention outputs there, and the official flash-attn
path yet something else. The Rust model computes ordinary attention for every row, so the
fixtures are computed with the fast path disabled; the tests still compare the per-token
outputs at non-pad positions only, which agree across all three paths.
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[3]
N_GENES = 97
PAD_ID, CLS_ID, EOC_ID = 97, 98, 99
NTOKEN = 100


def import_original_model():
    spec = importlib.util.find_spec("scgpt")
    if spec is None:
        sys.exit("scgpt is not installed: pip install --no-deps scgpt==0.2.4")
    root = spec.submodule_search_locations[0]
    for name, path in [("scgpt", root), ("scgpt.model", os.path.join(root, "model"))]:
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        sys.modules[name] = mod
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash_attn is not installed"
        return importlib.import_module("scgpt.model.model")


class Vocab(dict):
    """What TransformerModel reads from its `vocab` argument: vocab[pad_token]."""


def randomise(model, gen):
    """Perturb every parameter and BN buffer so the fixture exercises each of them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm / BN gamma
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.rand(p.shape, generator=gen) - 0.1)
            else:
                # nn.TransformerEncoder deep-copies one layer, so all layers start identical;
                # noise makes a swapped or repeated layer detectable.
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        # ContinuousValueEncoder.linear1 maps a scalar (bins 1..50, the 512 clamp) to d units;
        # with the default tiny bias the following LayerNorm makes it nearly scale-invariant,
        # so a wrong clamp or a missing ReLU would hide. Biases comparable to the inputs make
        # each unit switch on at a different value.
        lin1 = getattr(getattr(model, "value_encoder", None), "linear1", None)
        if lin1 is not None:
            lin1.bias.copy_(torch.empty(lin1.bias.shape).uniform_(-300.0, 300.0, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def make_batch(gen, lengths, L, value_fn, cls_value, pad_value):
    """src/values/mask like the original collators: <cls> first, genes, then <pad>."""
    B = len(lengths)
    src = torch.full((B, L), PAD_ID, dtype=torch.long)
    values = torch.full((B, L), float(pad_value))
    for i, n in enumerate(lengths):
        genes = torch.randperm(N_GENES, generator=gen)[: n - 1]
        src[i, 0] = CLS_ID
        src[i, 1:n] = genes
        values[i, 0] = cls_value
        values[i, 1:n] = value_fn(n - 1)
    mask = src.eq(PAD_ID)
    return src, values, mask


def flat(t):
    # str(np.float32) is the shortest text that round-trips the float32 value, which keeps
    # the JSON about half the size of Python's float64 repr.
    return [float(str(x)) for x in t.detach().reshape(-1).numpy().astype(np.float32)]


def tensor_json(t):
    return {"shape": list(t.shape), "data": flat(t) if t.dtype.is_floating_point else [int(x) for x in t.reshape(-1)]}


def rename_keys(sd, attn_style, wrap):
    """Give the PyTorch (non-flash) state_dict the naming of a real checkpoint."""
    out = OrderedDict()
    for k, v in sd.items():
        if attn_style == "flash":  # scgpt <= 0.2.4 with flash-attn 1.x: what best_model.pt has
            k = k.replace("self_attn.in_proj_", "self_attn.Wqkv.")
        elif attn_style == "flash_compat":  # scgpt 0.2.5 flash_attn_compat wrapper
            k = k.replace("self_attn.in_proj_", "self_attn._impl.Wqkv.")
            k = k.replace("self_attn.out_proj.", "self_attn._impl.out_proj.")
        elif attn_style != "torch":
            raise ValueError(attn_style)
        out[k] = v.detach().clone()
    if wrap == "plain":
        return out
    if wrap == "ddp_in_model":  # {"model": {"module.<key>": ...}, "epoch": 3}
        return {"model": OrderedDict(("module." + k, v) for k, v in out.items()), "epoch": 3}
    if wrap == "state_dict":
        return {"state_dict": out, "step": 1000}
    raise ValueError(wrap)


VARIANTS = {
    # The whole-human checkpoint's shape (reference §1.9): continuous input, MVC, no batch
    # labels; the file has an extra `flag_encoder.weight` and no `cls_decoder.*`.
    "continuous": dict(
        ctor=dict(n_cls=1, do_mvc=True, input_emb_style="continuous", cell_emb_style="cls",
                  pad_value=-2, explicit_zero_prob=False),
        args=dict(MVC=True, input_emb_style="continuous", pad_value=-2, mask_value=-1, n_bins=51),
        attn="flash", wrap="plain", drop_cls=True, add_flag=True, zipfile=True,
        lengths=[10, 7, 4], L=10, flags=dict(CLS=False, CCE=False, MVC=True, ECS=True),
    ),
    # Category input (pad = n_bins, mask = n_bins + 1), CLS head with 7 classes, explicit zero
    # probabilities, avg-pool cell embedding; a DDP checkpoint nested under "model" with
    # PyTorch's in_proj naming.
    "category_cls": dict(
        ctor=dict(n_cls=7, do_mvc=True, input_emb_style="category", n_input_bins=53,
                  cell_emb_style="avg-pool", pad_value=51, explicit_zero_prob=True),
        args=dict(MVC=True, n_cls=7, input_emb_style="category", n_input_bins=53, pad_value=51,
                  mask_value=52, n_bins=51, cell_emb_style="avg-pool", explicit_zero_prob=True),
        attn="torch", wrap="ddp_in_model", drop_cls=False, add_flag=False, zipfile=True,
        lengths=[9, 9, 5], L=9, flags=dict(CLS=True, CCE=True, MVC=True, ECS=False),
    ),
    # Batch integration setup: batch labels concatenated into the decoders, DSBN (affine=False,
    # domain = first label), DAB discriminator, explicit zero probs, w-pool cell embedding;
    # scgpt 0.2.5's `_impl.` names under "state_dict".
    "dsbn_batch": dict(
        ctor=dict(n_cls=1, do_mvc=True, do_dab=True, use_batch_labels=True, num_batch_labels=3,
                  domain_spec_batchnorm=True, input_emb_style="continuous",
                  cell_emb_style="w-pool", pad_value=-2, explicit_zero_prob=True),
        args=dict(MVC=True, DAB=True, use_batch_labels=True, num_batch_labels=3, DSBN=True,
                  input_emb_style="continuous", cell_emb_style="w-pool", pad_value=-2,
                  mask_value=-1, n_bins=51, explicit_zero_prob=True),
        attn="flash_compat", wrap="state_dict", drop_cls=False, add_flag=False, zipfile=True,
        lengths=[8, 6, 8], L=8, batch_labels=[2, 0, 1],
        flags=dict(CLS=True, CCE=False, MVC=True, ECS=True),
    ),
    # Scaling input with the plain (affine) BatchNorm; legacy (non-zip) torch.save format.
    "scaling_bn": dict(
        ctor=dict(n_cls=3, do_mvc=False, use_batch_labels=False, num_batch_labels=2,
                  domain_spec_batchnorm="batchnorm", input_emb_style="scaling",
                  cell_emb_style="cls", pad_value=0, explicit_zero_prob=False),
        args=dict(MVC=False, n_cls=3, num_batch_labels=2, domain_spec_batchnorm="batchnorm",
                  input_emb_style="scaling", pad_value=0, n_bins=51),
        attn="torch", wrap="plain", drop_cls=False, add_flag=False, zipfile=False,
        lengths=[6, 3], L=6, batch_labels=[1, 1],
        flags=dict(CLS=True, CCE=False, MVC=False, ECS=False),
    ),
}

DIMS = dict(embsize=32, nheads=4, d_hid=48, nlayers=2, n_layers_cls=3, dropout=0.2)


def build(mm, name, spec, seed):
    torch.manual_seed(seed)
    ctor = dict(spec["ctor"])
    model = mm.TransformerModel(
        ntoken=NTOKEN, d_model=DIMS["embsize"], nhead=DIMS["nheads"], d_hid=DIMS["d_hid"],
        nlayers=DIMS["nlayers"], nlayers_cls=DIMS["n_layers_cls"], dropout=DIMS["dropout"],
        vocab=Vocab({"<pad>": PAD_ID}), pad_token="<pad>", use_fast_transformer=False, **ctor,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    randomise(model, gen)
    model.eval()
    return model, gen


def generate(mm, name, spec, seed, out_dir):
    model, gen = build(mm, name, spec, seed)
    style = spec["ctor"]["input_emb_style"]
    if style == "category":
        value_fn = lambda n: torch.randint(0, 51, (n,), generator=gen).float()
        cls_value = 0.0  # tokenize_batch gives <cls> the value 0
    elif style == "scaling":
        value_fn = lambda n: torch.rand(n, generator=gen) * 3.0
        cls_value = 1.0
    else:
        # Bins 1..50, one masked value (-1) and one value above the 512 clamp.
        def value_fn(n):
            v = torch.randint(1, 51, (n,), generator=gen).float()
            v[0] = -1.0
            if n > 3:
                v[2] = 700.0
            return v
        cls_value = -2.0
    src, values, mask = make_batch(gen, spec["lengths"], spec["L"], value_fn, cls_value,
                                   spec["ctor"]["pad_value"])
    labels = spec.get("batch_labels")
    batch_labels = torch.tensor(labels, dtype=torch.long) if labels is not None else None

    flags = spec["flags"]
    with torch.no_grad():
        enc = model._encode(src, values, mask, batch_labels)
        out = model(src, values, mask, batch_labels=batch_labels, **flags)
        gene_embs = model.encoder(torch.arange(NTOKEN).unsqueeze(0))[0]
        # Cell-prompted generation: the cell embedding replaces the <cls> input embedding.
        generated = model.generate(out["cell_emb"], src, values, mask, batch_labels=batch_labels)

    outputs = {"transformer_output": tensor_json(enc), "mlm_output": tensor_json(out["mlm_output"]),
               "cell_emb": tensor_json(out["cell_emb"]),
               "gene_table_embs": tensor_json(gene_embs), "generate": tensor_json(generated)}
    for k in ["mlm_zero_probs", "cls_output", "mvc_output", "mvc_zero_probs", "dab_output"]:
        if k in out:
            outputs[k] = tensor_json(out[k])
    for k in ["loss_ecs", "loss_cce"]:
        if k in out:
            outputs[k] = float(out[k])

    sd = model.state_dict()
    if spec["drop_cls"]:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("cls_decoder."))
    if spec["add_flag"]:
        sd["flag_encoder.weight"] = torch.randn(2, DIMS["embsize"], generator=gen)
    ckpt = rename_keys(sd, spec["attn"], spec["wrap"])
    pt_path = out_dir / f"{name}.pt"
    torch.save(ckpt, pt_path, _use_new_zipfile_serialization=spec["zipfile"])

    args = dict(DIMS)
    args.update(spec["args"])
    args.update({"pad_token": "<pad>", "fast_transformer": True, "lr": 1e-4, "epochs": 6,
                 "save_dir": "/unused/by/the/model"})  # extra keys every args.json has
    (out_dir / f"{name}.args.json").write_text(json.dumps(args, indent=1) + "\n")

    fixture = {
        "generator": "tests/gen/model/gen_parity.py",
        "torch": torch.__version__,
        "scgpt": "0.2.4",
        "seed": seed,
        "ntoken": NTOKEN,
        "pad_token_id": PAD_ID,
        "checkpoint": {"file": pt_path.name, "attn_naming": spec["attn"], "wrap": spec["wrap"],
                       "zipfile": spec["zipfile"], "keys": len(sd)},
        "flags": flags,
        "inputs": {"src": tensor_json(src), "values": tensor_json(values),
                   "src_key_padding_mask": [bool(x) for x in mask.reshape(-1)],
                   "batch_labels": labels},
        "outputs": outputs,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(fixture) + "\n")
    print(f"{name}: {pt_path.stat().st_size} B checkpoint, "
          f"{(out_dir / f'{name}.json').stat().st_size} B outputs")


def dev_temp_generative_forward(model, flag_w, pg, pv, pm, gg, gm, input_cell_emb=None):
    """The dev-temp generative forward (reference §2.2) re-expressed on the 0.2.4 modules.

    The dev-temp code itself needs flash-attn 1.x (CUDA, fp16), so it cannot run here. This is
    its math in fp32: the pcpt stream is what FlashAttention computes (key padding; padded
    query rows come back as zeros before out_proj), and the gen stream is the very call
    dev-temp's `layers.MultiheadAttention` makes, `F.multi_head_attention_forward` with
    identity in/out projections and no out-proj bias, i.e. no `out_proj` for gen tokens.
    """
    import torch.nn.functional as F

    d = model.d_model
    pe = model.encoder(pg)
    pt = pe + model.value_encoder(pv)
    ge = model.encoder(gg)
    gt = ge + flag_w[1]
    if input_cell_emb is not None:
        pt = pt.clone()
        pt[:, 0, :] = input_cell_emb
    B, P, _ = pt.shape
    G = gt.shape[1]
    eye = torch.eye(d)
    attn_mask = torch.zeros(G, P + G, dtype=torch.bool)
    attn_mask[:, -G:] = ~torch.eye(G, dtype=torch.bool)
    kpm = torch.cat([pm, gm], dim=1)  # True = padding
    for layer in model.transformer_encoder.layers:
        sa = layer.self_attn
        h = sa.num_heads
        dh = d // h
        pqkv = F.linear(pt, sa.in_proj_weight, sa.in_proj_bias).reshape(B, P, 3, h, dh)
        q, k, v = (pqkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, h, P, dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(pm[:, None, None, :], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, P, d)
        ctx = ctx.masked_fill(pm[:, :, None], 0.0)  # FA1 unpad/pad: zero at padded queries
        pcpt_ctx = sa.out_proj(ctx)

        gqkv = F.linear(gt, sa.in_proj_weight, sa.in_proj_bias).reshape(B, G, 3, d)
        kv = torch.cat([pqkv.reshape(B, P, 3, d)[:, :, 1:], gqkv[:, :, 1:]], dim=1)
        gen_ctx, _ = F.multi_head_attention_forward(
            gqkv[:, :, 0].transpose(0, 1), kv[:, :, 0].transpose(0, 1), kv[:, :, 1].transpose(0, 1),
            d, h, in_proj_weight=None, in_proj_bias=None, bias_k=None, bias_v=None,
            add_zero_attn=False, dropout_p=0.0, out_proj_weight=eye, out_proj_bias=None,
            training=False, key_padding_mask=kpm, need_weights=False, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        )
        gen_ctx = gen_ctx.transpose(0, 1)

        def post(x, a):
            x = layer.norm1(x + a)
            return layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))

        pt, gt = post(pt, pcpt_ctx), post(gt, gen_ctx)
    out = torch.cat([pt, gt], dim=1)
    preds = model.decoder(out)["pred"]
    cell = out[:, 0, :]
    mvc = model.mvc_decoder(cell, torch.cat([pe, ge], dim=1))["pred"]
    return out, preds[:, :P], preds[:, P:], cell, mvc


def generative_setup(mm, seed):
    """The generative fixture's model, flag embedding and two-stream batch (B 3, P 7, G 4)."""
    spec = VARIANTS["continuous"]
    model, gen = build(mm, "generative", spec, seed)
    flag_w = torch.randn(2, DIMS["embsize"], generator=gen)
    B, P, G = 3, 7, 4
    pcpt_len, gen_len = [7, 5, 6], [4, 3, 2]
    pg = torch.full((B, P), PAD_ID, dtype=torch.long)
    pv = torch.full((B, P), -2.0)
    gg = torch.full((B, G), PAD_ID, dtype=torch.long)
    for i in range(B):
        genes = torch.randperm(N_GENES, generator=gen)
        pg[i, 0] = CLS_ID
        pg[i, 1:pcpt_len[i]] = genes[: pcpt_len[i] - 1]
        pv[i, 1:pcpt_len[i]] = torch.randint(1, 51, (pcpt_len[i] - 1,), generator=gen).float()
        gg[i, : gen_len[i]] = genes[pcpt_len[i] - 1 : pcpt_len[i] - 1 + gen_len[i]]
    pm, gm = pg.eq(PAD_ID), gg.eq(PAD_ID)
    return model, spec, flag_w, pg, pv, pm, gg, gm


def generate_generative(mm, seed, out_dir):
    """The whole-human pretraining layout: generative model, flag_encoder in the checkpoint."""
    name = "generative"
    model, spec, flag_w, pg, pv, pm, gg, gm = generative_setup(mm, seed)
    with torch.no_grad():
        out, pp, gp, cell, mvc = dev_temp_generative_forward(model, flag_w, pg, pv, pm, gg, gm)
        # The cell-prompt second pass of pretraining: pass 1's cell embedding at <cls>.
        out2, _, gp2, _, _ = dev_temp_generative_forward(model, flag_w, pg, pv, pm, gg, gm, cell)

    sd = OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith("cls_decoder."))
    sd["flag_encoder.weight"] = flag_w
    torch.save(rename_keys(sd, "flash", "plain"), out_dir / f"{name}.pt")
    args = dict(DIMS)
    args.update(spec["args"])
    args.update({"pad_token": "<pad>", "USE_GENERATIVE_TRAINING": True, "fast_transformer": True})
    (out_dir / f"{name}.args.json").write_text(json.dumps(args, indent=1) + "\n")
    fixture = {
        "generator": "tests/gen/model/gen_parity.py (dev_temp_generative_forward)",
        "torch": torch.__version__, "scgpt": "0.2.4 modules, dev-temp generative math",
        "seed": seed, "ntoken": NTOKEN, "pad_token_id": PAD_ID,
        "checkpoint": {"file": f"{name}.pt", "keys": len(sd)},
        "inputs": {"pcpt_genes": tensor_json(pg), "pcpt_values": tensor_json(pv),
                   "pcpt_key_padding_mask": [bool(x) for x in pm.reshape(-1)],
                   "gen_genes": tensor_json(gg),
                   "gen_key_padding_mask": [bool(x) for x in gm.reshape(-1)]},
        "outputs": {"transformer_output": tensor_json(out), "pcpt_preds": tensor_json(pp),
                    "gen_preds": tensor_json(gp), "cell_emb": tensor_json(cell),
                    "mvc_output": tensor_json(mvc),
                    "pass2_transformer_output": tensor_json(out2),
                    "pass2_gen_preds": tensor_json(gp2)},
    }
    (out_dir / f"{name}.json").write_text(json.dumps(fixture) + "\n")
    print(f"{name}: {(out_dir / f'{name}.pt').stat().st_size} B checkpoint, "
          f"{(out_dir / f'{name}.json').stat().st_size} B outputs")


def masked_mse(pred, target, m):
    m = m.float()
    return ((pred * m - target * m) ** 2).sum() / m.sum()


GRAD_PARAMS = [
    "encoder.embedding.weight",
    "encoder.enc_norm.weight",
    "value_encoder.linear1.weight",
    "value_encoder.linear1.bias",
    "value_encoder.norm.bias",
    "transformer_encoder.layers.0.self_attn.in_proj_bias",
    "transformer_encoder.layers.1.self_attn.in_proj_weight",
    "transformer_encoder.layers.1.self_attn.out_proj.weight",
    "transformer_encoder.layers.0.linear1.weight",
    "transformer_encoder.layers.1.norm2.weight",
    "decoder.fc.4.weight",
    "mvc_decoder.W.weight",
    "mvc_decoder.gene2query.bias",
]


def generate_training(mm, out_dir):
    """Training-mode references: gradients of a GEP + GEPC + ECS loss through the
    `continuous` model (same weights as continuous.pt, dropout set to 0 so both sides are
    deterministic), and one training-mode step of the affine-free BatchNorm1d DSBN uses."""
    spec = VARIANTS["continuous"]
    model, _ = build(mm, "continuous", spec, seed=1000)  # identical to continuous.pt
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    model.train()
    gen = torch.Generator().manual_seed(3000)

    def value_fn(n):
        return torch.randint(1, 51, (n,), generator=gen).float()

    src, values, mask = make_batch(gen, [9, 6, 8], 9, value_fn, -2.0, -2)
    target = torch.randint(1, 51, src.shape, generator=gen).float()
    sel = (~mask) & (torch.rand(src.shape, generator=gen) < 0.6)
    sel[:, 0] = False
    out = model(src, values, mask, MVC=True, ECS=True)
    loss = (masked_mse(out["mlm_output"], target, sel) + masked_mse(out["mvc_output"], target, sel)
            + 10.0 * out["loss_ecs"])
    loss.backward()
    params = dict(model.named_parameters())
    grads = {k: tensor_json(params[k].grad) for k in GRAD_PARAMS}

    bn_gen = torch.Generator().manual_seed(3001)
    x = torch.randn(3, 6, 5, generator=bn_gen) * 2.0 + 0.5
    bn = torch.nn.BatchNorm1d(6, eps=6.1e-5, affine=False)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=bn_gen))
        bn.running_var.copy_(0.5 + torch.rand(6, generator=bn_gen))
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    bn.train()
    y = bn(x)

    # scgpt/loss.py on fixed tensors, including probabilities at 0 and 1 (Bernoulli clamps).
    lossmod = importlib.import_module("scgpt.loss")
    l_gen = torch.Generator().manual_seed(3002)
    pred = torch.randn(4, 7, generator=l_gen) * 5 + 10
    tgt = torch.randint(0, 20, (4, 7), generator=l_gen).float()
    probs = torch.rand(4, 7, generator=l_gen)
    probs[0, 0], probs[1, 1] = 0.0, 1.0
    lmask = torch.rand(4, 7, generator=l_gen) < 0.5
    lmask[0, 0] = lmask[1, 1] = True
    losses = {"pred": tensor_json(pred), "target": tensor_json(tgt), "probs": tensor_json(probs),
              "mask": [bool(v) for v in lmask.reshape(-1)],
              "masked_mse_loss": float(lossmod.masked_mse_loss(pred, tgt, lmask)),
              "criterion_neg_log_bernoulli": float(lossmod.criterion_neg_log_bernoulli(probs, tgt, lmask)),
              "masked_relative_error": float(lossmod.masked_relative_error(pred, tgt, lmask))}

    fixture = {
        "generator": "tests/gen/model/gen_parity.py (generate_training)",
        "losses": losses,
        "torch": torch.__version__, "checkpoint": "continuous.pt",
        "inputs": {"src": tensor_json(src), "values": tensor_json(values),
                   "src_key_padding_mask": [bool(v) for v in mask.reshape(-1)],
                   "target": tensor_json(target), "loss_mask": [bool(v) for v in sel.reshape(-1)]},
        "loss": float(loss.detach()),
        "grads": grads,
        "batch_norm": {"eps": 6.1e-5, "momentum": 0.1, "x": tensor_json(x),
                       "running_mean_before": tensor_json(rm0), "running_var_before": tensor_json(rv0),
                       "y": tensor_json(y.detach()), "running_mean_after": tensor_json(bn.running_mean),
                       "running_var_after": tensor_json(bn.running_var)},
    }
    (out_dir / "training.json").write_text(json.dumps(fixture) + "\n")
    print(f"training: {(out_dir / 'training.json').stat().st_size} B")


GENERATIVE_GRAD_PARAMS = [
    "encoder.embedding.weight",
    "encoder.enc_norm.weight",
    "value_encoder.linear1.weight",
    "transformer_encoder.layers.0.self_attn.in_proj_weight",
    "transformer_encoder.layers.0.self_attn.in_proj_bias",
    "transformer_encoder.layers.1.self_attn.in_proj_weight",
    "transformer_encoder.layers.1.self_attn.out_proj.weight",
    "transformer_encoder.layers.0.linear1.weight",
    "transformer_encoder.layers.1.norm1.weight",
    "decoder.fc.4.weight",
    "mvc_decoder.W.weight",
    "mvc_decoder.gene2query.weight",
]


def generate_generative_grad(mm, seed, out_dir):
    """Gradients of the whole two-pass generative pretraining loss on generative.pt's weights
    and batch (dropout 0): pass 1 gene-prompted, GEP (gen-token expression) + GEPC (the MVC
    head at the gen positions); pass 2 cell-prompted with pass 1's detached cell embedding at
    <cls>, GEP again; squared errors over non-padded gen tokens, summed, divided by their count
    (what scgpt-train's generative task computes for one micro-batch)."""
    model, _, flag_w, pg, pv, pm, gg, gm = generative_setup(mm, seed)
    # Eval mode is the dropout-0 training step: the continuous model has no batch norm, and
    # dropout is the only module that reads the mode.
    model.eval()
    flag_w = flag_w.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed + 100)
    P = pg.shape[1]
    target = torch.randint(1, 51, gg.shape, generator=gen).float()
    keep = (~gm).float()
    sq = lambda pred: (((pred - target) * keep) ** 2).sum()
    out, pp, gp, cell, mvc = dev_temp_generative_forward(model, flag_w, pg, pv, pm, gg, gm)
    gep, gepc = sq(gp), sq(mvc[:, P:])
    _, _, gp2, _, _ = dev_temp_generative_forward(model, flag_w, pg, pv, pm, gg, gm, cell.detach())
    cell_prompt = sq(gp2)
    loss = (gep + gepc + cell_prompt) / keep.sum()
    loss.backward()
    params = dict(model.named_parameters())
    grads = {k: tensor_json(params[k].grad) for k in GENERATIVE_GRAD_PARAMS}
    grads["flag_encoder.weight"] = tensor_json(flag_w.grad)
    fixture = {
        "generator": "tests/gen/model/gen_parity.py (generate_generative_grad)",
        "torch": torch.__version__, "checkpoint": "generative.pt",
        "inputs": {"gen_target": tensor_json(target)},
        "terms": {"gep": float(gep.detach()), "gepc": float(gepc.detach()), "cell_prompt": float(cell_prompt.detach())},
        "loss": float(loss.detach()),
        "grads": grads,
    }
    (out_dir / "generative_grad.json").write_text(json.dumps(fixture) + "\n")
    print(f"generative_grad: {(out_dir / 'generative_grad.json').stat().st_size} B")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/model")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # reduction order, hence the last bits, independent of the box
    torch.backends.mha.set_fastpath_enabled(False)
    mm = import_original_model()
    for i, (name, spec) in enumerate(VARIANTS.items()):
        if a.only and name not in a.only:
            continue
        generate(mm, name, spec, seed=1000 + i, out_dir=a.out)
    if not a.only or "generative" in a.only:
        generate_generative(mm, seed=2000, out_dir=a.out)
    if not a.only or "generative_grad" in a.only:
        generate_generative_grad(mm, seed=2000, out_dir=a.out)
    if not a.only or "training" in a.only:
        generate_training(mm, out_dir=a.out)


if __name__ == "__main__":
    main()
