"""Why fine-tuning makes the inference-free student worse (issue #6, docs/notes/retrieval-quality.md).

On the `cpu` preset's fine-tuning set (SciFact train queries x 4 candidates), fine-tuning only:

  alignment   candidate 0 is a judged positive, no mined negative is one, each teacher's and the
              ensemble target's top-1 rate, how peaked the target is
  gradient    the step-0 gradient of each ranking loss (KL, KL with the positive anchored,
              MarginMSE) w.r.t. the MLM output bias summed over the vocabulary, and w.r.t. the
              active weights of positive and negative documents: positive sums mean gradient
              descent lowers every term's logit, i.e. documents shrink without any FLOPS term

    python benchmarks/probes/retrieval_train_checks.py     # ~10 min on one CPU core (teacher scores cached)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.config import load_config  # noqa: E402
from sparsedistill.data.beir import load_beir  # noqa: E402
from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, _variant, ensemble_targets, prepare_data  # noqa: E402
from sparsedistill.retrieval import IDFTable, QueryEncoder, SparseDocEncoder  # noqa: E402
from sparsedistill.retrieval.losses import ranking_loss  # noqa: E402

PRESET = Path(__file__).resolve().parents[2] / "src/sparsedistill/recipes/configs/retrieval_train/cpu.toml"
FINETUNE_ONLY = ["student.pretrain.steps=0", 'variants=["no-pretrain"]', "loss.flops_weight=0"]


def alignment(data, cfg, variant) -> None:
    exs = data.finetune
    qrels = load_beir("scifact", split="train").qrels
    judged = lambda ex, key: qrels[ex.origin_qid].get(key.split("/", 1)[1], 0) > 0  # noqa: E731
    print(f"candidate 0 is a judged positive: {sum(judged(ex, ex.candidates[0]) for ex in exs)} / {len(exs)}")
    print(f"lists with a judged positive among the negatives: {sum(any(judged(ex, c) for c in ex.candidates[1:]) for ex in exs)}")
    scores = {n: data.scores[("finetune", n)] for n, _ in variant["teachers"]}
    for n, s in scores.items():
        print(f"{n}: top-1 is candidate 0 for {float((torch.as_tensor(s).argmax(1) == 0).float().mean()):.3f}")
    target = ensemble_targets(scores, variant["teachers"], cfg.teachers.scale)
    p = torch.softmax(target, -1)
    print(f"ensemble target: top-1 is candidate 0 for {float((target.argmax(1) == 0).float().mean()):.3f}, "
          f"mean top probability {float(p.max(1).values.mean()):.3f}, entropy {float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()):.3f} nats")


def gradient(data, cfg, variant, n_queries: int = 64, batch: int = 8) -> None:
    exs = data.finetune
    scores = {n: data.scores[("finetune", n)] for n, _ in variant["teachers"]}
    enc = SparseDocEncoder(None, max_length=cfg.student.max_length).eval()  # no dropout: a deterministic gradient
    qenc = QueryEncoder(enc.tokenizer, IDFTable.from_corpus([t for k, t in data.corpus.items() if k.startswith("scifact/")], enc.tokenizer))
    rows = torch.randperm(len(exs), generator=torch.Generator().manual_seed(0))[:n_queries]
    head = enc.mlm.cls.predictions
    for name, kind, margin in [("KL", "kl", -1.0), ("KL, positive anchored (margin 2)", "kl", 2.0), ("MarginMSE", "margin_mse", -1.0)]:
        target = ensemble_targets(scores, variant["teachers"], cfg.teachers.scale, margin)
        sums = torch.zeros(3)
        for i in range(0, n_queries, batch):
            r = rows[i : i + batch]
            b = [exs[int(j)] for j in r]
            enc.zero_grad()
            docs = enc([data.corpus[k] for ex in b for k in ex.candidates])
            docs.retain_grad()
            s = torch.einsum("bv,bcv->bc", qenc([ex.query for ex in b]), docs.view(len(b), len(b[0].candidates), -1))
            ranking_loss(kind, s, target[r]).backward()
            d3 = docs.detach().view(len(b), len(b[0].candidates), -1)
            g = docs.grad.view_as(d3) * (d3 > 0)  # only active terms get a gradient through log(1 + ReLU)
            bias_grad = head.bias.grad if head.bias.grad is not None else head.decoder.bias.grad  # tied in BERT's MLM head
            sums += torch.tensor([float(bias_grad.sum()), float(g[:, 0].sum()), float(g[:, 1:].sum())])
        b_, pos, neg = (sums / (n_queries // batch)).tolist()
        print(f"{name:34s} sum dL/d(output bias) {b_:+.4f}   sum dL/dw, positives' active terms {pos:+.3f}, negatives' {neg:+.3f}")


def main() -> int:
    torch.set_num_threads(1)
    cfg = load_config(RetrievalTrainConfig, PRESET, FINETUNE_ONLY)
    data = prepare_data(cfg, "cpu", progress=False)
    variant = _variant(cfg, "no-pretrain")
    alignment(data, cfg, variant)
    gradient(data, cfg, variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
