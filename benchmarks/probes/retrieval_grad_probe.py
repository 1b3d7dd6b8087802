"""Step-0 gradient of the ranking loss w.r.t. the MLM output bias: does descent lower every term's logit (sparser docs)?"""
import torch
torch.set_num_threads(1)
from pathlib import Path
from sparsedistill.config import load_config
from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, prepare_data, ensemble_targets, _variant
from sparsedistill.retrieval import SparseDocEncoder, QueryEncoder, IDFTable
from sparsedistill.retrieval.losses import ranking_loss
cfg = load_config(RetrievalTrainConfig, Path("src/sparsedistill/recipes/configs/retrieval_train/cpu.toml"),
                  ["student.pretrain.steps=0", 'variants=["no-pretrain"]', "loss.flops_weight=0"])
data = prepare_data(cfg, "cpu", progress=False)
exs = data.finetune
v = _variant(cfg, "no-pretrain")
sc = {n: data.scores[("finetune", n)] for n, _ in v["teachers"]}
enc = SparseDocEncoder(None, max_length=128).eval()  # no dropout: a deterministic gradient
idf = IDFTable.from_corpus([t for k, t in data.corpus.items() if k.startswith("scifact/")], enc.tokenizer)
qe = QueryEncoder(enc.tokenizer, idf)
g = torch.Generator().manual_seed(0)
rows = torch.randperm(len(exs), generator=g)[:64]
for name, kind, margin in [("kl", "kl", -1), ("kl anchored 2", "kl", 2.0), ("margin_mse", "margin_mse", -1)]:
    T = ensemble_targets(sc, v["teachers"], 20.0, margin)
    tot_bias, tot_pos, tot_neg, nb = 0.0, 0.0, 0.0, 0
    for i in range(0, 64, 8):
        r = rows[i:i+8]
        b = [exs[int(j)] for j in r]
        enc.zero_grad()
        d = enc([data.corpus[k] for ex in b for k in ex.candidates])
        d.retain_grad()
        q = qe([ex.query for ex in b])
        s = torch.einsum("bv,bcv->bc", q, d.view(len(b), 4, -1))
        loss = ranking_loss(kind, s, T[r])
        loss.backward()
        gb = enc.mlm.cls.predictions.bias.grad if enc.mlm.cls.predictions.bias.grad is not None else enc.mlm.cls.predictions.decoder.bias.grad
        tot_bias += gb.sum().item()
        gd = d.grad.view(len(b), 4, -1)
        act = (d.view(len(b), 4, -1) > 0).float()
        tot_pos += (gd[:, 0] * act[:, 0]).sum().item(); tot_neg += (gd[:, 1:] * act[:, 1:]).sum().item()
        nb += 1
    print(f"{name:14s} sum dL/dbias {tot_bias/nb:+.4f}  sum dL/dw positive docs {tot_pos/nb:+.3f}  negatives {tot_neg/nb:+.3f}")
