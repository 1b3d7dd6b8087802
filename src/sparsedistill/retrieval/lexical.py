"""BM25's term-frequency impacts of a document's own tokens, blended into learned document vectors: one index.

An inference-free query is its tokens times IDF (``QueryEncoder``), and ``IDFTable`` is BM25's IDF over the encoder's
vocabulary. So BM25 over those same tokens is a dot product too: the query's IDF vector with the document's saturated
term frequencies ``tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))``. Adding ``weight`` times those impacts to the
learned vectors scores ``student + weight * BM25`` with the same query vector, the same engine and no query model;
learned query-term weights scale both parts alike. ``support="student"`` adds impacts only where the learned vector
is nonzero (no new postings: the student's density); ``"union"`` also adds the document's tokens the student
dropped. The weight is chosen on training queries (``choose_lexical_weight``), never on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import Tensor

from .term_weights import ndcg_at_10

__all__ = ["SUPPORTS", "lexical_impacts", "blend_documents", "choose_lexical_weight", "relevance_matrix", "density"]

SUPPORTS = ("student", "union")


def lexical_impacts(texts: Sequence[str], tokenizer, vocab_size: int, k1: float = 1.2, b: float = 0.75,
                    batch: int = 1024) -> Tensor:
    """(documents, vocab) sparse BM25 impacts of each text's tokens (the whole text: BM25 truncates nothing; special
    tokens left out)."""
    if k1 <= 0 or not 0 <= b <= 1:
        raise ValueError(f"BM25 needs k1 > 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    special = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)
    rows, cols, tfs, lengths = [], [], [], []
    for s in range(0, len(texts), batch):
        ids = tokenizer(list(texts[s : s + batch]), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        for r, toks in enumerate(ids, start=s):
            t = torch.tensor(toks, dtype=torch.long)
            t = t[~torch.isin(t, special)]
            u, count = t.unique(return_counts=True)
            rows.append(torch.full_like(u, r))
            cols.append(u)
            tfs.append(count.float())
            lengths.append(t.numel())
    if not texts:
        raise ValueError("no documents given")
    dl = torch.tensor(lengths, dtype=torch.float32)
    row, col, tf = torch.cat(rows), torch.cat(cols), torch.cat(tfs)
    if col.numel() and int(col.max()) >= vocab_size:
        raise ValueError(f"the tokenizer gives ids up to {int(col.max())} but the vectors have {vocab_size} entries")
    norm = k1 * (1 - b + b * dl / dl.mean().clamp(min=1e-9))
    impact = tf * (k1 + 1) / (tf + norm[row])
    return torch.sparse_coo_tensor(torch.stack([row, col]), impact, (len(texts), vocab_size)).coalesce()


def blend_documents(docs: Tensor, impacts: Tensor, weight: float, support: str = "union") -> Tensor:
    """``docs + weight * impacts`` (both (documents, vocab) sparse), on the learned vectors' nonzeros alone
    (``support="student"``) or on both's (``"union"``)."""
    if support not in SUPPORTS:
        raise ValueError(f"unknown support {support!r}; choose from {SUPPORTS}")
    if docs.shape != impacts.shape:
        raise ValueError(f"document vectors {tuple(docs.shape)} and impacts {tuple(impacts.shape)} differ in shape")
    if weight < 0:
        raise ValueError(f"the lexical weight must be >= 0, got {weight}")
    docs, impacts = docs.coalesce().float(), impacts.coalesce().float()
    if weight == 0:  # the sum would keep explicit zeros where only the impacts have a term: counted as nonzeros
        return docs
    if support == "union":
        return (docs + weight * impacts).coalesce()
    mask = torch.sparse_coo_tensor(docs.indices(), torch.ones_like(docs.values()), docs.shape)
    on_support = (impacts * mask).coalesce()  # sparse x sparse elementwise: the impacts where the student has a term
    return (docs + weight * on_support).coalesce()


def choose_lexical_weight(docs: Tensor, impacts: Tensor, queries: Tensor, gains: Tensor, weights: Sequence[float],
                          support: str = "student") -> tuple[float, dict[float, float]]:
    """The weight of ``weights`` whose blend ranks ``queries`` ((queries, vocab) dense vectors, as served) best by
    NDCG@10 against ``gains`` ((queries, documents) graded relevance; a query without a relevant document counts 0);
    ties go to the smaller weight. Returns it and
    every weight's NDCG@10."""
    if not weights:
        raise ValueError("no lexical weights to choose from")
    if gains.shape != (queries.shape[0], docs.shape[0]):
        raise ValueError(f"gains must be (queries, documents) = {(queries.shape[0], docs.shape[0])}, got {tuple(gains.shape)}")
    q = queries.float().to_sparse_csr()
    curve: dict[float, float] = {}
    for w in sorted(set(float(x) for x in weights)):
        d = blend_documents(docs, impacts, w, support).t().coalesce().to_sparse_csr()
        curve[w] = float(ndcg_at_10((q @ d).to_dense(), gains))
    best = max(curve, key=lambda w: (curve[w], -w))
    return best, curve


def relevance_matrix(qids: Sequence[str], doc_ids: Sequence[str], qrels: dict[str, dict[str, int]]) -> Tensor:
    """(queries, documents) graded relevance from BEIR qrels (judged documents missing from the corpus ignored)."""
    col = {d: i for i, d in enumerate(doc_ids)}
    gains = torch.zeros(len(qids), len(doc_ids))
    for r, q in enumerate(qids):
        for d, g in qrels.get(q, {}).items():
            if d in col and g > 0:
                gains[r, col[d]] = float(g)
    return gains


def density(docs: Tensor) -> float:
    """Average nonzeros per document of (documents, vocab) sparse vectors."""
    return docs.coalesce().values().count_nonzero().item() / max(docs.shape[0], 1)

