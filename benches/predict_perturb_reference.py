"""The original's perturbation prediction in PyTorch (CPU), for benches/predict_perturb_bench.sh.

Tutorial_Perturbation's `predict(model, pert_list, pool_size)` over the bench's screen: the
screen read with anndata, its control cells (`condition == "ctrl"`), and per condition GEARS's
`create_cell_graph_dataset_for_prediction` (`pool_size` control cells drawn with
`np.random.randint`, `.X.toarray()`, one [genes, 2] feature matrix per cell: value, pert flag),
batches of 64 collated as torch_geometric's DataLoader does (x concatenated, [B·genes, 2]), and
the 0.2.4 package's own `TransformerGenerator.pred_perturb(batch, include_zero_gene="all",
gene_ids, amp=False)` (eval mode, `torch.no_grad()`, every screen gene a token), then the mean
over the pool. GEARS and torch_geometric are not installed in this venv (GEARS imports scanpy),
so their two functions are restated here line for line (a minimal `Data`/`Batch`).

The model: the generator built as the tutorial builds it (nlayers_cls=3, n_cls=1, pad_value 0,
pert_pad_id 0, flash-attn off) with the bench's sizes and random weights (speed does not depend
on them); `gene_ids` maps the screen's genes to the ids of the vocabulary given (ours:
best_model/vocab.json), `<pad>` for genes outside it, as the tutorial does.

  python benches/predict_perturb_reference.py --input screen.h5ad --vocab RUN/best_model/vocab.json \
      --pool 300 --d 64 --heads 4 --d-hid 64 --layers 2
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/gen/model"))
from gen_parity import Vocab  # noqa: E402
from gen_perturbation import import_generation_model  # noqa: E402


class Data:
    """torch_geometric.data.Data, as GEARS uses it for prediction: x and pert."""

    def __init__(self, x, pert):
        self.x, self.pert = x, pert

    def to(self, device):
        self.x = self.x.to(device)
        return self


class Batch:
    """torch_geometric's collation of such Data: x concatenated, pert listed."""

    def __init__(self, items):
        self.x = torch.cat([d.x for d in items], dim=0)
        self.pert = [d.pert for d in items]

    def to(self, device):
        self.x = self.x.to(device)
        return self


def create_cell_graph_for_prediction(X, pert_idx, pert_gene):  # gears/utils.py
    pert_feats = np.zeros(len(X))
    for p in pert_idx:
        pert_feats[int(np.abs(p))] = np.sign(p)
    feature_mat = torch.Tensor(np.vstack([X, pert_feats])).T
    return Data(x=feature_mat, pert=pert_gene)


def create_cell_graph_dataset_for_prediction(pert_gene, ctrl_adata, gene_names, device,
                                             num_samples=300):  # gears/utils.py
    pert_idx = [np.where(p == np.array(gene_names))[0][0] for p in pert_gene]
    Xs = ctrl_adata[np.random.randint(0, len(ctrl_adata), num_samples), :].X.toarray()
    return [create_cell_graph_for_prediction(X, pert_idx, pert_gene).to(device) for X in Xs]


def predict(model, pert_list, ctrl_adata, gene_list, gene_ids, pool_size, batch_size):
    """Tutorial_Perturbation's predict(), amp off, include_zero_gene "all"."""
    for pert in pert_list:
        for i in pert:
            if i not in gene_list:
                raise ValueError(f"The gene {i} is not in the perturbation graph.")
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        results_pred = {}
        for pert in pert_list:
            cell_graphs = create_cell_graph_dataset_for_prediction(
                pert, ctrl_adata, gene_list, device, num_samples=pool_size)
            preds = []
            for i in range(0, len(cell_graphs), batch_size):  # DataLoader(shuffle=False)
                batch_data = Batch(cell_graphs[i:i + batch_size])
                preds.append(model.pred_perturb(batch_data, "all", gene_ids=gene_ids, amp=False))
            preds = torch.cat(preds, dim=0)
            results_pred["_".join(pert)] = np.mean(preds.detach().cpu().numpy(), axis=0)
    return results_pred


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="the screen (GEARS-format h5ad)")
    ap.add_argument("--vocab", required=True, help="vocab.json of the model (token -> id)")
    ap.add_argument("--conditions", type=int, default=0,
                    help="predict the first N genes' singles (0 = every screen gene)")
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-hid", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    logging.getLogger("scGPT").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    vocab = json.loads(Path(a.vocab).read_text())
    if isinstance(vocab, list):
        vocab = {t: i for i, t in enumerate(vocab)}
    gm = import_generation_model()
    model = gm.TransformerGenerator(
        ntoken=len(vocab), d_model=a.d, nhead=a.heads, d_hid=a.d_hid, nlayers=a.layers,
        nlayers_cls=3, n_cls=1, vocab=Vocab({"<pad>": vocab["<pad>"]}), dropout=0.0,
        pad_token="<pad>", pad_value=0, pert_pad_id=0, use_fast_transformer=False)
    adata = anndata.read_h5ad(a.input)
    ctrl_adata = adata[adata.obs["condition"] == "ctrl"]
    gene_list = adata.var["gene_name"].tolist()
    gene_ids = np.array([vocab.get(g, vocab["<pad>"]) for g in gene_list], dtype=int)
    genes = gene_list[: a.conditions] if a.conditions else gene_list
    pert_list = [[g] for g in genes]
    t0 = time.perf_counter()
    res = predict(model, pert_list, ctrl_adata, gene_list, gene_ids, a.pool, a.batch)
    loop = time.perf_counter() - t0
    assert len(res) == len(pert_list)
    cells = len(pert_list) * a.pool
    print(json.dumps({
        "mode": "predict", "conditions": len(pert_list), "genes": len(gene_list),
        "pool": a.pool, "cells": cells, "control_cells": ctrl_adata.n_obs,
        "loop_s": loop, "setup_s": t0 - t_start, "conditions_per_s": len(pert_list) / loop,
        "cells_per_s": cells / loop, "torch": torch.__version__, "threads": a.threads,
        "ntoken": len(vocab)}))


if __name__ == "__main__":
    main()
