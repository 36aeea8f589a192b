#!/usr/bin/env python3
"""A whole-human-sized random checkpoint and the original's outputs for it (not committed).

Writes into OUT (default /tmp/scgpt-whole-human-random):
  best_model.pt   the original 0.2.4 TransformerModel at the whole-human size (vocab 60697,
                  d 512, 8 heads, d_hid 512, 12 layers), randomised, saved with the key set of
                  the real checkpoint (flash `Wqkv` names, `flag_encoder.weight`, no
                  `cls_decoder.*`); about 205 MB
  args.json       the whole-human args.json model fields
  reference.json  a padded batch and the original's eval outputs for it

Then: SCGPT_WHOLE_HUMAN_DIR=OUT cargo test -p scgpt-model --test whole_human -- --ignored

Same setup as gen_parity.py (venv with torch, numpy, tqdm, scgpt==0.2.4 --no-deps).
"""

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_parity as gp  # noqa: E402

NTOKEN, PAD_ID, CLS_ID = 60697, 60694, 60695
ARGS = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12, "n_layers_cls": 3,
        "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51,
        "input_emb_style": "continuous", "MVC": True, "USE_GENERATIVE_TRAINING": True,
        "fast_transformer": True, "n_cls": 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/scgpt-whole-human-random"))
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--len", type=int, default=128)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.backends.mha.set_fastpath_enabled(False)
    mm = gp.import_original_model()
    torch.manual_seed(7)
    model = mm.TransformerModel(
        ntoken=NTOKEN, d_model=512, nhead=8, d_hid=512, nlayers=12, nlayers_cls=3, n_cls=1,
        vocab=gp.Vocab({"<pad>": PAD_ID}), dropout=0.2, pad_token="<pad>", pad_value=-2,
        do_mvc=True, use_fast_transformer=False,
    )
    gen = torch.Generator().manual_seed(8)
    gp.randomise(model, gen)
    model.eval()

    B, L = a.batch, a.len
    lengths = [L] + [max(2, L - 37 * (i + 1)) for i in range(B - 1)]
    src = torch.full((B, L), PAD_ID, dtype=torch.long)
    values = torch.full((B, L), -2.0)
    for i, n in enumerate(lengths):
        src[i, 0] = CLS_ID
        src[i, 1:n] = torch.randperm(PAD_ID, generator=gen)[: n - 1]
        values[i, 1:n] = torch.randint(1, 51, (n - 1,), generator=gen).float()
    mask = src.eq(PAD_ID)
    with torch.no_grad():
        out = model(src, values, mask, MVC=True)
        enc = model._encode(src, values, mask)

    sd = OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith("cls_decoder."))
    sd["flag_encoder.weight"] = torch.randn(2, 512, generator=gen)
    torch.save(gp.rename_keys(sd, "flash", "plain"), a.out / "best_model.pt")
    (a.out / "args.json").write_text(json.dumps(ARGS, indent=1) + "\n")
    ref = {
        "ntoken": NTOKEN, "pad_token_id": PAD_ID, "keys": len(sd),
        "params": sum(v.numel() for v in sd.values()),
        "inputs": {"src": gp.tensor_json(src), "values": gp.tensor_json(values),
                   "src_key_padding_mask": [bool(x) for x in mask.reshape(-1)]},
        "outputs": {"transformer_output": gp.tensor_json(enc),
                    "mlm_output": gp.tensor_json(out["mlm_output"]),
                    "cell_emb": gp.tensor_json(out["cell_emb"]),
                    "mvc_output": gp.tensor_json(out["mvc_output"])},
    }
    (a.out / "reference.json").write_text(json.dumps(ref) + "\n")
    print(f"{a.out}: {len(sd)} tensors, {ref['params']} parameters")


if __name__ == "__main__":
    main()
