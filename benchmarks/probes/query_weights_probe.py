"""Can the query side learn its term weights? (issue #6: "IDF tables ... optionally trained")

The inference-free query is its tokens weighted by IDF. This probe keeps the untrained SPLADE-tiny
documents fixed and learns one multiplier per vocabulary entry, weight = IDF x exp(g), g = 0 at the
start, from SciFact's *train* qrels (a listwise softmax over the whole corpus, L2 on g), with 20 % of
those queries held out to pick the step. Then it scores the test queries of SciFact and of Cranfield
(whose vocabulary SciFact's queries barely touch) with and without the learned g, against BM25.
Test qrels never choose anything.

    OMP_NUM_THREADS=2 python benchmarks/probes/query_weights_probe.py --out benchmarks/probes/query_weights_probe_cpu.json

Document vectors are cached under --cache (encoding SciFact at 256 tokens takes minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from ranx import Qrels

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.data.beir import load_beir  # noqa: E402
from sparsedistill.retrieval.evaluation import ranked_metrics  # noqa: E402
from sparsedistill.retrieval.encoders import QueryEncoder, SparseDocEncoder  # noqa: E402
from sparsedistill.retrieval.idf import IDFTable  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402


def doc_matrix(name: str, ids: list[str], texts: list[str], enc: SparseDocEncoder, cache: Path, batch: int = 32) -> torch.Tensor:
    """(documents, vocab) sparse matrix of the untrained SPLADE-tiny's vectors, cached (the key assumes that encoder)."""
    f = cache / f"{name}_docs_{enc.max_length}.pt"
    if f.exists():
        return torch.load(f)
    from tqdm.auto import tqdm

    rows = []
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), batch), desc=f"{name} documents"):
            rows.append(enc(texts[i : i + batch]).to_sparse_csr())
    m = torch.cat([r.to_sparse_coo() for r in rows]).coalesce()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(m, f)
    return m


def bm25_metrics(col, ids, texts, qids, qrels) -> dict[str, float]:
    import bm25s

    tok = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    model = bm25s.BM25()
    model.index(tok, show_progress=False)
    res, sc = model.retrieve(bm25s.tokenize([col.queries[q] for q in qids], stopwords="en", show_progress=False),
                             k=100, show_progress=False)
    scores = torch.full((len(qids), len(ids)), float("-inf"))
    scores.scatter_(1, torch.as_tensor(res, dtype=torch.long), torch.as_tensor(sc, dtype=torch.float32))
    return ranked_metrics(scores, ids, qids, qrels, 100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--temperature", type=float, default=1.0, help="softmax over scores / T")
    ap.add_argument("--cache", type=Path, default=Path("runs/query-weights-probe"))
    ap.add_argument("--out", type=Path, default=Path("query_weights_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    enc = SparseDocEncoder(max_length=256).eval()
    tok = enc.tokenizer

    cols, mats, idfs = {}, {}, {}
    for name in ("scifact", "cranfield"):
        col = load_beir(name, "test")
        ids = list(col.corpus)
        texts = [col.corpus[i] for i in ids]
        cols[name], mats[name] = (col, ids, texts), doc_matrix(name, ids, texts, enc, args.cache)
        idfs[name] = IDFTable.from_corpus(texts, tok)

    def qmatrix(name: str, qtexts: list[str], g: torch.Tensor | None) -> torch.Tensor:
        q = QueryEncoder(tok, idfs[name])(qtexts)
        return q if g is None else q * g.exp()

    def scores(name: str, q: torch.Tensor) -> torch.Tensor:  # (queries, documents)
        return torch.sparse.mm(mats[name], q.t()).t()

    # SciFact train qrels: 80 % learn g, 20 % pick the step and the L2 weight
    train = load_beir("scifact", "train")
    ids = cols["scifact"][1]
    pos = {i: n for n, i in enumerate(ids)}
    tq = sorted(q for q in train.qrels if any(d in pos and gain > 0 for d, gain in train.qrels[q].items()))
    random.Random(0).shuffle(tq)
    dev_q, fit_q = tq[: len(tq) // 5], tq[len(tq) // 5 :]
    target = torch.zeros(len(fit_q), len(ids))
    for r, q in enumerate(fit_q):
        for d, gain in train.qrels[q].items():
            if gain > 0 and d in pos:
                target[r, pos[d]] = 1.0
    q_fit = QueryEncoder(tok, idfs["scifact"])([train.queries[q] for q in fit_q])
    q_dev = [train.queries[q] for q in dev_q]

    def dev_ndcg(g: torch.Tensor) -> float:
        s = scores("scifact", qmatrix("scifact", q_dev, g))
        return ranked_metrics(s, ids, dev_q, Qrels({q: train.qrels[q] for q in dev_q}), 100)["ndcg@10"]

    out: dict = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                 "fit_queries": len(fit_q), "dev_queries": len(dev_q), "runs": []}
    g0 = torch.zeros(q_fit.shape[1])
    base_dev = dev_ndcg(g0)
    best = {"dev_ndcg@10": base_dev, "l2": None, "step": 0, "g": g0}
    for l2 in args.l2:
        g = torch.zeros(q_fit.shape[1], requires_grad=True)
        opt = torch.optim.Adam([g], lr=args.lr)
        curve = []
        t0 = time.time()
        for step in range(1, args.steps + 1):
            s = scores("scifact", q_fit * g.exp()) / args.temperature
            loss = -(torch.logsumexp(s.masked_fill(target == 0, float("-inf")), 1) - torch.logsumexp(s, 1)).mean()
            loss = loss + l2 * (g**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0:
                d = dev_ndcg(g.detach())
                curve.append({"step": step, "loss": float(loss.detach()), "dev_ndcg@10": d})
                print(f"l2 {l2:g} step {step}: loss {float(loss.detach()):.4f} dev NDCG@10 {100 * d:.2f} (untrained {100 * base_dev:.2f})", flush=True)
                if d > best["dev_ndcg@10"]:
                    best = {"dev_ndcg@10": d, "l2": l2, "step": step, "g": g.detach().clone()}
        out["runs"].append({"l2": l2, "curve": curve, "seconds": time.time() - t0})

    g = best["g"]
    out["chosen"] = {k: v for k, v in best.items() if k != "g"} | {"nonzero_g": int((g != 0).sum()),
                                                                   "g_abs_max": float(g.abs().max())}
    out["test"] = {}
    for name, (col, ids_, texts) in cols.items():
        qids = sorted(col.qrels)
        qt = [col.queries[q] for q in qids]
        qrels = Qrels({q: col.qrels[q] for q in qids})
        row = {"bm25": bm25_metrics(col, ids_, texts, qids, qrels),
               "idf": ranked_metrics(scores(name, qmatrix(name, qt, None)), ids_, qids, qrels, 100),
               "idf_learned": ranked_metrics(scores(name, qmatrix(name, qt, g)), ids_, qids, qrels, 100)}
        out["test"][name] = row
        print(name, {k: {m: round(100 * v, 2) for m, v in r.items()} for k, r in row.items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
