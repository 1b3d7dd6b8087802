"""Learned query-term weights: the one trainable part of an inference-free query side.

A query is its tokens weighted by IDF. ``QueryTermWeights`` multiplies each vocabulary entry's IDF
by ``exp(g)`` (``g = 0`` everywhere is plain IDF), so query time stays a table lookup. The table
belongs to a document encoder (saved beside it as ``query_weights.json``) and applies on top of any
collection's IDF (``apply(idf) -> IDFTable``): an index, the service and the OpenSearch IDF export
read one effective table and need no code of their own.

``fit_term_weights`` learns ``g`` with the documents fixed: a listwise softmax over each collection's
whole corpus, L2 on ``g``, Adam; held-out queries pick the step. A query's target is either its
relevant documents (labels, or a pseudo-query's source document) or a teacher's distribution over
its top documents (cross-entropy: the query side distilled from dense teachers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runs import atomic_write_bytes
from .idf import IDFTable, tokenizer_fingerprint

__all__ = ["QUERY_WEIGHTS_FILE", "QueryTermWeights", "QuerySet", "TermWeightFit", "fit_term_weights", "ndcg_at_10"]

QUERY_WEIGHTS_FILE = "query_weights.json"


class QueryTermWeights:
    def __init__(self, log_scale: Tensor, fingerprint: str) -> None:
        self.log_scale = log_scale.detach().float().cpu()  # (vocab,) g: the multiplier is exp(g)
        self.fingerprint = fingerprint

    def check(self, tokenizer) -> None:
        if tokenizer_fingerprint(tokenizer) != self.fingerprint:
            raise ValueError("these query-term weights were learned with another tokenizer (vocabulary fingerprint differs); "
                             "learn them again for this encoder (`sparsedistill retrieval train` with query.learn=true)")

    def apply(self, idf: IDFTable) -> IDFTable:
        """``idf`` with every entry times ``exp(g)``: the table a query encoder, index or export then uses."""
        if idf.fingerprint != self.fingerprint:
            raise ValueError("the IDF table and the query-term weights come from different tokenizers; build both with the encoder's")
        if idf.weights.numel() != self.log_scale.numel():
            raise ValueError(f"IDF table has {idf.weights.numel()} entries, the query-term weights {self.log_scale.numel()}")
        return IDFTable(idf.weights * self.log_scale.exp(), idf.fingerprint)

    def stats(self) -> dict[str, Any]:
        moved = self.log_scale != 0
        return {"entries_moved": int(moved.sum()), "vocab": self.log_scale.numel(),
                "abs_log_scale_max": float(self.log_scale.abs().max()) if moved.any() else 0.0}

    def save(self, path: str | Path) -> None:
        nz = torch.nonzero(self.log_scale).flatten().tolist()
        data = {"fingerprint": self.fingerprint, "vocab": self.log_scale.numel(),
                "log_scale": {str(i): float(self.log_scale[i]) for i in nz}}
        atomic_write_bytes(Path(path), json.dumps(data).encode())

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> "QueryTermWeights":
        try:
            data = json.loads(Path(path).read_text())
            g = torch.zeros(int(data["vocab"]))
            for i, v in data["log_scale"].items():
                if not 0 <= int(i) < g.numel():
                    raise IndexError(f"entry {i} outside the vocabulary of {g.numel()}")
                g[int(i)] = float(v)
            out = cls(g, data["fingerprint"])
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a query-term weights file ({type(e).__name__}: {e}); "
                             "delete it to use plain IDF, or learn it again") from e
        if tokenizer is not None:
            out.check(tokenizer)
        return out

    @classmethod
    def find(cls, model_dir: str | Path | None, tokenizer=None) -> "QueryTermWeights | None":
        """The weights saved with an encoder folder, or None if it has none (plain IDF)."""
        if not model_dir:
            return None
        f = Path(model_dir) / QUERY_WEIGHTS_FILE
        return cls.load(f, tokenizer) if f.exists() else None


@dataclass
class TermWeightFit:
    steps: int = 50
    lr: float = 0.05
    l2: float = 0.03  # on sum(g^2): without it the table overfits the few hundred training queries
    eval_every: int = 10
    temperature: float = 1.0  # the softmax runs over scores / temperature
    query_batch: int = 512  # queries per forward (gradients accumulate over the whole set each step)


@dataclass
class QuerySet:
    """One collection's queries for the fit: IDF query vectors and their targets over the documents."""

    name: str
    docs: Tensor  # sparse COO (documents, vocab), the fixed document vectors
    queries: Tensor  # dense (queries, vocab), plain-IDF query vectors of that collection's table
    positives: list[list[int]]  # per query, rows of ``docs`` that are relevant
    # optional teacher targets: (indices, probabilities), each (queries, k): then the fit's loss is the cross-entropy
    # to them and held-out NDCG uses them as graded gains; ``positives`` are kept for reference
    soft: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.queries.shape[0] != len(self.positives):
            raise ValueError(f"{self.name}: {self.queries.shape[0]} query vectors but {len(self.positives)} positive lists")
        if any(not p for p in self.positives):
            raise ValueError(f"{self.name}: every query needs at least one relevant document")
        if self.docs.shape[1] != self.queries.shape[1]:
            raise ValueError(f"{self.name}: documents have {self.docs.shape[1]} vocabulary entries, queries {self.queries.shape[1]}")
        if self.soft is not None and not (self.soft[0].shape == self.soft[1].shape and self.soft[0].shape[0] == len(self.positives)):
            raise ValueError(f"{self.name}: teacher targets must be (queries, k) indices and probabilities, one row per query")
        # Only the vocabulary entries some query holds matter: keep the documents' columns for those, dense and
        # transposed, so a batch's scores are a sparse (queries x entries) by dense product (COO x COO was ~50x slower).
        self.cols = torch.nonzero(self.queries.any(0)).flatten()
        docs = self.docs.coalesce()
        (r, c), v = docs.indices(), docs.values()
        keep = torch.isin(c, self.cols)
        self.docs_t = torch.zeros(self.cols.numel(), docs.shape[0])
        self.docs_t[torch.searchsorted(self.cols, c[keep]), r[keep]] = v[keep].float()

    def gains(self, rows: slice) -> Tensor:
        """(queries, documents) relevance: 1 for positives, or the teacher's probabilities."""
        n = self.docs.shape[0]
        if self.soft is not None:
            idx, p = self.soft[0][rows], self.soft[1][rows]
            return torch.zeros(idx.shape[0], n).scatter_(1, idx, p)
        pos = self.positives[rows]
        g = torch.zeros(len(pos), n)
        for r, p in enumerate(pos):
            g[r, p] = 1.0
        return g

    def loss(self, scores: Tensor, rows: slice) -> Tensor:
        """Summed over the rows: -log P(relevant) under the softmax, or the cross-entropy to the teacher."""
        if self.soft is not None:
            idx, p = self.soft[0][rows], self.soft[1][rows]
            return (torch.logsumexp(scores, 1) - (p * scores.gather(1, idx)).sum(1)).sum()
        pos = self.gains(rows) > 0
        return (torch.logsumexp(scores, 1) - torch.logsumexp(scores.masked_fill(~pos, float("-inf")), 1)).sum()


def _scores(s: QuerySet, scale: Tensor, rows: slice) -> Tensor:
    """(queries, documents): each query's IDF weights times exp(g), dotted with every document."""
    q = s.queries[rows][:, s.cols].to_sparse().coalesce()
    (r, c), v = q.indices(), q.values()
    weighted = torch.sparse_coo_tensor(q.indices(), v * scale[s.cols][c], q.shape, check_invariants=False)
    return torch.sparse.mm(weighted, s.docs_t)


def ndcg_at_10(scores: Tensor, gains: Tensor) -> Tensor:
    """Mean NDCG@10 (linear gains): ``scores`` and ``gains`` (boolean or float) are (queries, documents)."""
    k = min(10, scores.shape[1])
    gains = gains.float()
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2)
    dcg = (gains.gather(1, scores.topk(k, dim=1).indices) * disc).sum(1)
    idcg = (gains.topk(k, dim=1).values * disc).sum(1)
    return (dcg / idcg.clamp_min(1e-9)).mean()


@torch.no_grad()
def _dev_ndcg(sets: Sequence[QuerySet], scale: Tensor, batch: int) -> float:
    total, n = 0.0, 0
    for s in sets:
        for b in range(0, len(s.positives), batch):
            rows = slice(b, b + batch)
            q = len(s.positives[rows])
            total += float(ndcg_at_10(_scores(s, scale, rows), s.gains(rows))) * q
            n += q
    return total / n if n else math.nan


def fit_term_weights(fit: Sequence[QuerySet], dev: Sequence[QuerySet], fingerprint: str, cfg: TermWeightFit | None = None,
                     progress: bool = True) -> tuple[QueryTermWeights, dict[str, Any]]:
    """Learn ``g`` on ``fit``; returns the table at the step with the best NDCG@10 on ``dev`` (step 0 = plain IDF
    included, so a fit that does not help leaves IDF as it was) and the fit's history."""
    cfg = cfg or TermWeightFit()
    if not fit or not dev:
        raise ValueError("fit_term_weights needs queries to fit and held-out queries to choose the step")
    vocab = fit[0].queries.shape[1]
    n_fit = sum(len(s.positives) for s in fit)
    g = torch.zeros(vocab, requires_grad=True)
    opt = torch.optim.Adam([g], lr=cfg.lr)
    best = {"step": 0, "dev_ndcg@10": _dev_ndcg(dev, torch.ones(vocab), cfg.query_batch), "g": torch.zeros(vocab)}
    curve = [{"step": 0, "loss": None, "dev_ndcg@10": best["dev_ndcg@10"]}]
    for step in tqdm(range(1, cfg.steps + 1), desc="query-term weights", disable=not progress, leave=False):
        opt.zero_grad()
        scale, total = g.exp(), 0.0
        for s in fit:
            for b in range(0, len(s.positives), cfg.query_batch):
                rows = slice(b, b + cfg.query_batch)
                nll = s.loss(_scores(s, scale, rows) / cfg.temperature, rows) / n_fit
                nll.backward(retain_graph=True)  # the graph through g.exp() is shared by every batch
                total += float(nll.detach())
        reg = cfg.l2 * (g**2).sum()
        reg.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            d = _dev_ndcg(dev, g.detach().exp(), cfg.query_batch)
            curve.append({"step": step, "loss": total + float(reg.detach()), "dev_ndcg@10": d})
            if d > best["dev_ndcg@10"]:
                best = {"step": step, "dev_ndcg@10": d, "g": g.detach().clone()}
    weights = QueryTermWeights(best["g"], fingerprint)
    history = {"fit_queries": n_fit, "dev_queries": sum(len(s.positives) for s in dev), "chosen_step": best["step"],
               "dev_ndcg@10_plain_idf": curve[0]["dev_ndcg@10"], "dev_ndcg@10_chosen": best["dev_ndcg@10"],
               "curve": curve, "config": vars(cfg).copy(), **weights.stats()}
    return weights, history
