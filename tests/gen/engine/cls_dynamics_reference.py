# CLS-in-MLM dynamics in the original scGPT 0.2.4 TransformerModel (PyTorch, CPU), same tiny
# architecture and recipe as the Rust test `mlm_with_cls_trains_the_classifier_on_the_labels`.
# Usage: python tests/gen/engine/cls_dynamics_reference.py tests/data/pbmc68k_reduced.h5ad [LEN] [STEPS]
# Prints the CLS loss per 20 steps, held-out accuracy and the mean cosine of the <cls> embeddings.
import importlib.util, json, sys, numpy as np, torch, anndata
from pathlib import Path
spec = importlib.util.find_spec("scgpt"); pkg = Path(spec.origin).parent
sys.path.insert(0, str(pkg.parent))
import types
# import scgpt/model/model.py without the package's heavy __init__
scgpt_mod = types.ModuleType("scgpt"); scgpt_mod.__path__ = [str(pkg)]; sys.modules["scgpt"] = scgpt_mod
sub = types.ModuleType("scgpt.model"); sub.__path__ = [str(pkg / "model")]; sys.modules["scgpt.model"] = sub
import scgpt.model.model as M
torch.manual_seed(0); rng = np.random.default_rng(0)
a = anndata.read_h5ad(sys.argv[1]); X = a.raw.X.toarray() if hasattr(a.raw.X, "toarray") else a.raw.X
names = list(a.raw.var_names)
labels = a.obs["bulk_labels"].astype(str).values; classes = sorted(set(labels)); y = np.array([classes.index(l) for l in labels])
ntoken = len(names) + 3; PAD, CLS = len(names), len(names) + 1
L = int(sys.argv[2]) if len(sys.argv) > 2 else 128
def cell(i):
    nz = np.nonzero(X[i])[0]; v = X[i, nz]
    edges = np.quantile(v, np.linspace(0, 1, 50)); b = np.digitize(v, edges); b = np.clip(b, 1, 50)
    if len(nz) > L - 1:
        k = rng.choice(len(nz), L - 1, replace=False); nz, b = nz[k], b[k]
    return nz, b.astype(np.float32)
n = X.shape[0]; perm = rng.permutation(n); valid = perm[: n // 5]; train = perm[n // 5 :]
model = M.TransformerModel(ntoken, 32, 2, 32, 2, nlayers_cls=3, n_cls=len(classes), vocab={"<pad>": PAD}, dropout=0.2, pad_token="<pad>", pad_value=-2, do_mvc=True, input_emb_style="continuous", cell_emb_style="cls", use_fast_transformer=False)

opt = torch.optim.Adam(model.parameters(), lr=3e-3)
def batch(idx, mask_ratio=0.4):
    cs = [cell(i) for i in idx]; l = max(len(g) for g, _ in cs) + 1
    src = torch.full((len(idx), l), PAD); val = torch.full((len(idx), l), -2.0); tgt = val.clone(); m = torch.zeros(len(idx), l, dtype=torch.bool)
    for r, (g, b) in enumerate(cs):
        src[r, 0] = CLS; src[r, 1:len(g) + 1] = torch.tensor(g); tgt[r, 1:len(g) + 1] = torch.tensor(b)
        mm = torch.rand(len(g)) < mask_ratio; vv = torch.tensor(b).clone(); vv[mm] = -1.0
        val[r, 1:len(g) + 1] = vv; m[r, 1:len(g) + 1] = mm
    return src, val, src.eq(PAD), tgt, m
curve = []
for step in range(int(sys.argv[3]) if len(sys.argv) > 3 else 120):
    idx = rng.choice(train, 16, replace=False); src, val, pad, tgt, m = batch(idx)
    out = model(src, val, src_key_padding_mask=pad, CLS=True, MVC=True)
    gep = ((out["mlm_output"] - tgt)[m] ** 2).mean(); gepc = ((out["mvc_output"] - tgt)[m] ** 2).mean()
    ce = torch.nn.functional.cross_entropy(out["cls_output"], torch.tensor(y[idx]))
    loss = gep + gepc + ce; opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    curve.append(ce.item())
model.eval(); correct = 0; embs = []
with torch.no_grad():
    for s in range(0, len(valid), 32):
        idx = valid[s : s + 32]; src, val, pad, tgt, m = batch(idx, 0.0)
        out = model(src, val, src_key_padding_mask=pad, CLS=True)
        correct += (out["cls_output"].argmax(1).numpy() == y[idx]).sum()
        e = out["cell_emb"]; embs.append(torch.nn.functional.normalize(e, dim=1))
E = torch.cat(embs); print(json.dumps({"cls_loss_per_20": [round(float(np.mean(curve[i:i+20])), 3) for i in range(0, len(curve), 20)], "valid_acc": correct / len(valid), "mean_cos": float((E @ E.T).mean())}))
