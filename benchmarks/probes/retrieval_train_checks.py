"""Diagnostics of the retrieval training path (scratch, not committed)."""
import json, sys, random
import torch
torch.set_num_threads(1)
import numpy as np
from pathlib import Path
from sparsedistill.config import load_config
from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, prepare_data, ensemble_targets, _variant
from sparsedistill.retrieval import SparseDocEncoder, QueryEncoder, IDFTable
from sparsedistill.data.beir import load_beir

cfg = load_config(RetrievalTrainConfig, Path("src/sparsedistill/recipes/configs/retrieval_train/cpu.toml"),
                  ["student.pretrain.steps=0", 'variants=["no-pretrain"]', "loss.flops_weight=0"])
data = prepare_data(cfg, "cpu", progress=False)
exs = data.finetune
v = _variant(cfg, "no-pretrain")
T = ensemble_targets({n: data.scores[("finetune", n)] for n, _ in v["teachers"]}, v["teachers"], cfg.teachers.scale)
print("examples", len(exs), "targets", tuple(T.shape))
train = load_beir("scifact", split="train")
ok = sum(ex.candidates[0].split("/", 1)[1] in train.qrels[ex.origin_qid] and train.qrels[ex.origin_qid][ex.candidates[0].split("/",1)[1]] > 0 for ex in exs)
print("candidate 0 is a judged positive:", ok, "/", len(exs))
negpos = sum(any(c.split("/",1)[1] in train.qrels[ex.origin_qid] for c in ex.candidates[1:]) for ex in exs)
print("negatives that are judged positives:", negpos)
for n, _ in v["teachers"]:
    s = torch.as_tensor(data.scores[("finetune", n)])
    print(n, "argmax==0:", (s.argmax(1) == 0).float().mean().item(), "mean score", s.mean(0).tolist())
print("ensemble target argmax==0:", (T.argmax(1) == 0).float().mean().item())
print("target rows (first 5):", T[:5].tolist())
p = torch.softmax(T, -1)
print("target softmax: mean max prob", p.max(1).values.mean().item(), "mean p[0]", p[:, 0].mean().item(),
      "entropy", (-(p * p.clamp_min(1e-12).log()).sum(1)).mean().item())

# student scores, train-time vs eval-time
enc = SparseDocEncoder(None, max_length=cfg.student.max_length)
idf_train = IDFTable.from_corpus(list(data.corpus.values()), enc.tokenizer)
sci = load_beir("scifact")
idf_eval = IDFTable.from_corpus([sci.corpus[i] for i in sci.corpus], enc.tokenizer)
print("IDF: train table over", len(data.corpus), "docs; eval over", len(sci.corpus),
      "; mean |diff| on nonzero", (idf_train.weights - idf_eval.weights).abs()[idf_eval.weights > 0].mean().item())
q_tr = QueryEncoder(enc.tokenizer, idf_train)
q_ev = QueryEncoder(enc.tokenizer, idf_eval)
# corpus text equality train vs eval
keys = [k for ex in exs[:50] for k in ex.candidates]
same_text = sum(data.corpus[k] == sci.corpus[k.split("/", 1)[1]] for k in keys)
print("corpus text identical train vs eval:", same_text, "/", len(keys))

sub = exs[:200]
Ts = T[:200]
def scores(enc_mode, ml, qenc):
    enc.max_length = ml
    enc.train(enc_mode == "train")
    out = []
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(0, len(sub), 8):
            b = sub[i:i+8]
            d = enc([data.corpus[k] for ex in b for k in ex.candidates])
            q = qenc([ex.query for ex in b])
            out.append(torch.einsum("bv,bcv->bc", q, d.view(len(b), -1, d.shape[-1])))
    return torch.cat(out)
S_train = scores("train", 128, q_tr)
S_eval128 = scores("eval", 128, q_tr)
S_eval = scores("eval", 256, q_ev)
S_eval256_trIDF = scores("eval", 256, q_tr)
for name, S in [("train-mode 128 trainIDF", S_train), ("eval 128 trainIDF", S_eval128), ("eval 256 trainIDF", S_eval256_trIDF), ("eval 256 evalIDF (=evaluation)", S_eval)]:
    agree = (S.argmax(1) == Ts.argmax(1)).float().mean().item()
    pos = (S.argmax(1) == 0).float().mean().item()
    spread = (S.max(1).values - S.min(1).values).mean().item()
    from sparsedistill.retrieval.losses import kl_ranking_loss
    print(f"{name:34s} argmax==teacher {agree:.3f} argmax==pos {pos:.3f} spread {spread:.1f} KL {kl_ranking_loss(S, Ts).item():.3f}")
print("train-mode vs eval-mode (128) mean |diff|", (S_train - S_eval128).abs().mean().item(), "relative", ((S_train - S_eval128).abs().mean() / S_eval128.abs().mean()).item())
print("128 vs 256 mean |diff|", (S_eval128 - S_eval256_trIDF).abs().mean().item())
