#!/usr/bin/env python3
"""Attention-GRN fixture for crates/scgpt-model: raw attention scores and their rank
normalisation, computed the way the original `Tutorial_Attention_GRN.ipynb` computes them.

Builds the original `scgpt.model.model.TransformerModel` (PyPI scgpt 0.2.4) at a tiny size with
`domain_spec_batchnorm="batchnorm"`, so that it has the plain `bn` the tutorial's fine-tuned
model carries (finetune-reference §5 and §7 pitfall 1), randomises every parameter and BatchNorm
buffer as `gen_parity.py` does, and writes:

  tests/data/model/attention_grn.pt         state_dict with flash `self_attn.Wqkv.*` names and
                                            `bn.*` (incl. `num_batches_tracked`)
  tests/data/model/attention_grn.args.json  args.json spelling, `domain_spec_batchnorm: "batchnorm"`
  tests/data/model/attention_grn.json       inputs, scores per layer, rank-normalised scores

The scores are the notebook's cell 24 step for step, in fp32 and eval mode under
`torch.no_grad()` (the notebook adds fp16 autocast):

    total_embs = model.encoder(src) + model.value_encoder(values)
    total_embs = model.bn(total_embs.permute(0, 2, 1)).permute(0, 2, 1)
    for layer in model.transformer_encoder.layers[:l]:
        total_embs = layer(total_embs, src_key_padding_mask=mask)
    qkv = model.transformer_encoder.layers[l].self_attn.Wqkv(total_embs)
    qkv = rearrange(qkv, 'b s (three h d) -> b s three h d', three=3, h=H)
    attn_scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)

Without flash-attn the 0.2.4 layers are `nn.TransformerEncoderLayer`s whose packed projection is
`self_attn.in_proj_weight/in_proj_bias`, the same [Q; K; V] rows as flash's `Wqkv` (the loader's
rename), so `Wqkv(x)` is `F.linear(x, in_proj_weight, in_proj_bias)`; the einops rearrange is
the row-major reshape `(B, L, 3, H, d/H)` (einops is not needed). H is the model's number of
heads (4); the notebook hard-codes 8 for its 8-head model. PyTorch's attention fast path is
disabled, as in gen_parity.py, so padded positions carry ordinary attention outputs. Every
layer's scores are checked against PyTorch itself before they are written: softmax(scores/sqrt(dh))
with the key mask must equal the per-head weights `MultiheadAttention` returns for the same input.

Two batches: `tutorial` (every cell has the same genes, `<cls>` first with value 0, binned
values with zeros, no padding: `tokenize_and_pad_batch(..., include_zero_gene=True)`), and
`padded` (cells of different lengths, so the key padding mask of layers 0..l-1 matters).

The rank normalisation (notebook cell 24, rows then columns, mean over heads) is recorded for
the `tutorial` batch at the last layer, with `torch.argsort(..., stable=True)`: the notebook's
argsort is unstable, and column ranks of row ranks tie often, so only a stable sort gives a
reference that does not depend on the sort kernel.

Run (same venv as gen_parity.py):
  /work/venv-torch/bin/python tests/gen/model/gen_attention_scores.py
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_parity as gp  # noqa: E402  (import_original_model, randomise, tensor_json, ...)

NAME = "attention_grn"
DIMS = dict(embsize=32, nheads=4, d_hid=48, nlayers=3, n_layers_cls=3, dropout=0.2)
SEED = 4000


def tutorial_scores(model, src, values, mask, layer):
    """Notebook cell 24 up to `attn_scores`, for one layer index."""
    B, L = src.shape
    H = DIMS["nheads"]
    d = DIMS["embsize"]
    total_embs = model.encoder(src) + model.value_encoder(values)
    total_embs = model.bn(total_embs.permute(0, 2, 1)).permute(0, 2, 1)
    for lyr in model.transformer_encoder.layers[:layer]:
        total_embs = lyr(total_embs, src_key_padding_mask=mask)
    sa = model.transformer_encoder.layers[layer].self_attn
    qkv = F.linear(total_embs, sa.in_proj_weight, sa.in_proj_bias)
    qkv = qkv.reshape(B, L, 3, H, d // H)
    q = qkv[:, :, 0, :, :]
    k = qkv[:, :, 1, :, :]
    return q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)


def check_against_mha(model, src, values, mask, layer, scores):
    """The scores are the layer's own attention: softmax(scores / sqrt(dh)) with the key mask
    equals the per-head weights PyTorch's MultiheadAttention returns for the same input."""
    x = model.encoder(src) + model.value_encoder(values)
    x = model.bn(x.permute(0, 2, 1)).permute(0, 2, 1)
    for lyr in model.transformer_encoder.layers[:layer]:
        x = lyr(x, src_key_padding_mask=mask)
    sa = model.transformer_encoder.layers[layer].self_attn
    _, w = sa(x, x, x, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
    dh = DIMS["embsize"] // DIMS["nheads"]
    mine = (scores / dh ** 0.5).masked_fill(mask[:, None, None, :], float("-inf")).softmax(-1)
    err = (mine - w).abs().max().item()
    assert err < 1e-5, f"layer {layer}: softmax of the scores differs from MHA's weights by {err}"


def tutorial_rank_normalise(attn_scores):
    """Notebook cell 24 after `attn_scores`, with stable argsorts and the model's H."""
    H = attn_scores.shape[1]
    M = attn_scores.shape[-1]
    attn_scores = attn_scores.reshape((-1, M))
    order = torch.argsort(attn_scores, dim=1, stable=True)
    rank = torch.argsort(order, dim=1, stable=True)
    attn_scores = rank.reshape((-1, H, M, M)) / M
    attn_scores = attn_scores.permute(0, 1, 3, 2).reshape((-1, M))
    order = torch.argsort(attn_scores, dim=1, stable=True)
    rank = torch.argsort(order, dim=1, stable=True)
    attn_scores = (rank.reshape((-1, H, M, M)) / M).permute(0, 1, 3, 2)
    return attn_scores.mean(1)


def bins(gen, n):
    """Binned values as the Preprocessor leaves them: 0 for unexpressed genes, else 1..50."""
    v = torch.randint(1, 51, (n,), generator=gen).float()
    v[torch.rand(n, generator=gen) < 0.35] = 0.0
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=gp.REPO / "tests/data/model")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)
    mm = gp.import_original_model()

    torch.manual_seed(SEED)
    model = mm.TransformerModel(
        ntoken=gp.NTOKEN, d_model=DIMS["embsize"], nhead=DIMS["nheads"], d_hid=DIMS["d_hid"],
        nlayers=DIMS["nlayers"], nlayers_cls=DIMS["n_layers_cls"], dropout=DIMS["dropout"],
        vocab=gp.Vocab({"<pad>": gp.PAD_ID}), pad_token="<pad>", pad_value=-2,
        input_emb_style="continuous", domain_spec_batchnorm="batchnorm",
        use_fast_transformer=False,
    )
    assert hasattr(model, "bn"), "the model must carry the plain batchnorm"
    gen = torch.Generator().manual_seed(SEED + 1)
    gp.randomise(model, gen)
    model.eval()

    batches = {}
    # tutorial: 3 cells, the same 13 genes, <cls> (value 0) first, no padding.
    genes = torch.randperm(gp.N_GENES, generator=gen)[:13]
    B, L = 3, 14
    src = torch.full((B, L), gp.CLS_ID, dtype=torch.long)
    src[:, 1:] = genes
    values = torch.zeros((B, L))
    for i in range(B):
        values[i, 1:] = bins(gen, L - 1)
    batches["tutorial"] = (src, values, src.eq(gp.PAD_ID))
    # padded: lengths 10, 7, 4 with <pad>/-2 after each cell.
    src, values, mask = gp.make_batch(gen, [10, 7, 4], 10, lambda n: bins(gen, n), 0.0, -2)
    batches["padded"] = (src, values, mask)

    fixture = {
        "generator": "tests/gen/model/gen_attention_scores.py",
        "torch": torch.__version__,
        "scgpt": "0.2.4",
        "seed": SEED,
        "ntoken": gp.NTOKEN,
        "pad_token_id": gp.PAD_ID,
        "nheads": DIMS["nheads"],
        "nlayers": DIMS["nlayers"],
        "batches": {},
    }
    with torch.no_grad():
        for name, (src, values, mask) in batches.items():
            entry = {
                "inputs": {"src": gp.tensor_json(src), "values": gp.tensor_json(values),
                           "src_key_padding_mask": [bool(x) for x in mask.reshape(-1)]},
                "scores": {},
            }
            for layer in range(DIMS["nlayers"]):
                s = tutorial_scores(model, src, values, mask, layer)
                check_against_mha(model, src, values, mask, layer, s)
                entry["scores"][str(layer)] = gp.tensor_json(s)
            if name == "tutorial":
                last = tutorial_scores(model, src, values, mask, DIMS["nlayers"] - 1)
                entry["rank_normalised_last_layer"] = gp.tensor_json(tutorial_rank_normalise(last))
            fixture["batches"][name] = entry

    sd = model.state_dict()
    assert "bn.running_mean" in sd and "bn.num_batches_tracked" in sd
    ckpt = gp.rename_keys(sd, "flash", "plain")
    pt_path = a.out / f"{NAME}.pt"
    torch.save(ckpt, pt_path)
    args = dict(DIMS)
    args.update({"input_emb_style": "continuous", "pad_value": -2, "mask_value": -1, "n_bins": 51,
                 "domain_spec_batchnorm": "batchnorm", "pad_token": "<pad>",
                 "fast_transformer": True, "lr": 1e-4, "save_dir": "/unused/by/the/model"})
    (a.out / f"{NAME}.args.json").write_text(json.dumps(args, indent=1) + "\n")
    fixture["checkpoint"] = {"file": pt_path.name, "attn_naming": "flash", "keys": len(sd)}
    (a.out / f"{NAME}.json").write_text(json.dumps(fixture) + "\n")
    print(f"{NAME}: {pt_path.stat().st_size} B checkpoint, "
          f"{(a.out / f'{NAME}.json').stat().st_size} B outputs")


if __name__ == "__main__":
    main()
