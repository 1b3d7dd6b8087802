"""Scoring a document encoder on a BEIR-layout collection: what the evaluation and training recipes share.

``evaluate_collection`` gives, for one collection, BM25 (bm25s) beside ours (documents through the encoder,
queries through the IDF table): NDCG@10 and Recall@100 of the exact float dot products and of the on-disk
engine (``SparseIndex``, uint8 impacts), nonzeros per document, index size, documents per second, one-thread
query latency for both, and optionally the teachers as retrievers. ``ranked_metrics`` scores any (queries,
documents) score matrix with ranx.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.beir import load_beir

__all__ = ["EvalSettings", "evaluate_collection", "encode_documents", "teacher_score_matrix", "ensemble_over_candidates",
           "ranked_metrics"]


@dataclass
class EvalSettings:
    """How ``evaluate_collection`` encodes and times (recipes' eval configs extend it)."""

    max_length: int = 256
    batch_size: int = 32
    latency_queries: int = 100
    # Teachers (minilm | mpnet | splade) evaluated as full retrievers on the same test sets: the quality a
    # distilled student can hope to approach. Dense ones cost minutes per collection on a CPU.
    teachers: list[str] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def evaluate_collection(name: str, cfg: EvalSettings, encoder, progress: bool, docs: torch.Tensor | None = None,
                        term_weights=None, binary_queries: bool = False) -> dict[str, Any]:
    """``docs``: the collection's document vectors if already encoded (sparse, corpus order); ``term_weights``: a
    ``QueryTermWeights`` applied on top of the collection's IDF (then ``ours_plain_idf`` holds the IDF-only figures);
    ``binary_queries``: queries as token presence, no IDF (a model trained that way; then ``ours_idf_queries`` holds
    the same documents scored with IDF queries, with ``term_weights`` on them if given, and
    ``ours_idf_queries_plain_idf`` the IDF-only figures)."""
    from ranx import Qrels, Run as RanxRun, evaluate

    from .bm25 import import_bm25s
    from .encoders import QueryEncoder
    from .idf import IDFTable, tokenizer_fingerprint
    from .index import SparseIndex

    bm25s = import_bm25s()

    c = load_beir(name)
    ids = list(c.corpus)
    texts = [c.corpus[i] for i in ids]
    queries = c.judged_queries()
    qids = list(queries)
    qrels = Qrels({q: dict(c.qrels[q]) for q in qids})
    metrics = ["ndcg@10", "recall@100"]
    out: dict[str, Any] = {"collection": c.name, "docs": len(ids), "queries": len(qids)}

    # BM25
    bm = bm25s.BM25()
    bm.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    depth = min(100, len(ids))
    res, sc = bm.retrieve(bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False), k=depth, show_progress=False)
    out["bm25"] = {k: float(v) for k, v in evaluate(qrels, RanxRun({q: {ids[int(d)]: float(s) for d, s in zip(res[i], sc[i])}
                                                                       for i, q in enumerate(qids)}), metrics).items()}

    # ours: documents through the model once, queries through the IDF table
    if docs is None:
        t0 = time.time()
        docs = encode_documents(encoder, texts, cfg.batch_size, progress, name)
        out["docs_per_s"] = len(ids) / (time.time() - t0)
        out["encode_device"] = str(next(encoder.parameters()).device)
    elif docs.shape[0] != len(ids):
        raise ValueError(f"{name}: {docs.shape[0]} precomputed document vectors for {len(ids)} documents")
    docs = docs.coalesce()
    out["nnz_per_doc"] = docs.values().numel() / len(ids)
    idf = IDFTable.from_corpus(texts, encoder.tokenizer)
    docs_t = docs.t().coalesce().to_sparse_csr()  # (vocab, docs): a query row times it scores every document

    def exact_scores(qenc) -> torch.Tensor:
        return torch.cat([(qenc([queries[q] for q in qids[s : s + 64]]).to_sparse_csr() @ docs_t).to_dense()
                          for s in range(0, len(qids), 64)])
    if term_weights is not None:  # binary queries have no weights to multiply: the table is for their IDF serving
        plain = "ours_idf_queries_plain_idf" if binary_queries else "ours_plain_idf"
        out[plain] = ranked_metrics(exact_scores(QueryEncoder(encoder.tokenizer, idf)), ids, qids, qrels, depth)
        idf = term_weights.apply(idf)
        out["query_weights"] = term_weights.stats()
    idf_qenc = QueryEncoder(encoder.tokenizer, idf) if binary_queries else None
    if binary_queries:
        out["ours_idf_queries"] = ranked_metrics(exact_scores(idf_qenc), ids, qids, qrels, depth)
    qenc = QueryEncoder(encoder.tokenizer, idf, binary=binary_queries)
    out["ours"] = ranked_metrics(exact_scores(qenc), ids, qids, qrels, depth)

    with tempfile.TemporaryDirectory(prefix="sparse-index-") as index_dir:
        index = SparseIndex.create(index_dir, docs.shape[1], tokenizer_fingerprint(encoder.tokenizer))
        index.add(ids, docs)
        st = index.stats()
        out["index"] = {"bytes_on_disk": st["bytes_on_disk"], "postings": st["postings"], "algorithm": index.algorithm}
        def served(enc) -> dict[str, float]:  # the engine's ranking (uint8 impacts) of every query
            hits = index.search_batch([enc([queries[q]]) for q in qids], k=depth)
            engine_run = {q: ({d: s for d, s in h} or {ids[0]: 0.0}) for q, h in zip(qids, hits)}  # ranx: non-empty runs
            return {k: float(v) for k, v in evaluate(qrels, RanxRun(engine_run), metrics).items()}

        out["ours_index"] = served(qenc)
        if binary_queries:  # the same index served with IDF queries
            out["ours_idf_queries_index"] = served(idf_qenc)

        # one-thread latency, one query at a time, same process
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            lat_bm, lat_ours = [], []
            for q in qids[: cfg.latency_queries]:
                t = time.perf_counter()
                bm.retrieve(bm25s.tokenize([queries[q]], stopwords="en", show_progress=False), k=min(10, depth), show_progress=False, n_threads=1)
                lat_bm.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                index.search(qenc([queries[q]]), k=min(10, depth))
                lat_ours.append((time.perf_counter() - t) * 1e3)
        finally:
            torch.set_num_threads(threads)
        index.close()
    out["latency_ms"] = {"bm25_p50": _percentile(lat_bm, 50), "bm25_p99": _percentile(lat_bm, 99),
                         "ours_p50": _percentile(lat_ours, 50), "ours_p99": _percentile(lat_ours, 99)}
    if cfg.teachers:
        qtexts = [queries[q] for q in qids]
        mats = {t: teacher_score_matrix(t, texts, qtexts, cfg, progress) for t in cfg.teachers}
        if len(mats) > 1:
            mats["ensemble"] = ensemble_over_candidates(list(mats.values()), depth)
        out["teachers"] = {t: ranked_metrics(m, ids, qids, qrels, depth) for t, m in mats.items()}
    return out


def encode_documents(encoder, texts: list[str], batch_size: int, progress: bool, name: str = "") -> torch.Tensor:
    """(documents, vocab) sparse COO document vectors, in ``texts`` order."""
    with torch.no_grad():
        chunks = [encoder(texts[s : s + batch_size]).to_sparse() for s in
                  tqdm(range(0, len(texts), batch_size), desc=f"encode {name}", disable=not progress, leave=False)]
    return torch.cat(chunks).coalesce()


def doc_vectors_file(run_dir: Path, label: str, collection: str, max_length: int, model_key: str) -> Path:
    """Where a run caches a model's document vectors of a collection (``model_key``: its weights' hash, or "base")."""
    return Path(run_dir) / "doc-vectors" / f"{label}-{collection}-{max_length}-{model_key}.pt"


def save_doc_vectors(path: Path, ids: list[str], docs: torch.Tensor, docs_per_s: float, device: str) -> None:
    """Atomically, as CSR: the ids in corpus order, the (documents, vocab) vectors, how fast they were encoded, where."""
    from ..runs import atomic_torch_save

    csr = docs.to_sparse_csr()
    atomic_torch_save({"ids": ids, "crow": csr.crow_indices(), "col": csr.col_indices().int(), "values": csr.values(),
                       "shape": tuple(docs.shape), "docs_per_s": docs_per_s, "device": device}, path)


def load_doc_vectors(path: Path) -> tuple[list[str], torch.Tensor, float, str]:
    """``(ids, (documents, vocab) sparse COO vectors, documents/s, device)`` as ``save_doc_vectors`` wrote them."""
    saved = torch.load(path)
    m = torch.sparse_csr_tensor(saved["crow"], saved["col"].long(), saved["values"], saved["shape"])
    return saved["ids"], m.to_sparse_coo().coalesce(), saved["docs_per_s"], saved.get("device", "cpu")


def teacher_score_matrix(name: str, texts: list[str], qtexts: list[str], cfg: EvalSettings, progress: bool,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """(queries, documents) scores of one teacher over the whole collection."""
    from .teachers import load_teacher

    teacher = load_teacher(name, max_length=cfg.max_length, batch_size=cfg.batch_size, device=device)
    d = teacher.encode(texts, progress, f"{name} documents")  # dense rows (cosine) or a scipy CSR (SPLADE dot products)
    q = teacher.encode(qtexts, progress, f"{name} queries")
    return torch.from_numpy(np.asarray((q @ d.T).todense() if hasattr(q, "tocsr") else q @ d.T, dtype=np.float32))


def ensemble_over_candidates(scores: list[torch.Tensor], depth: int) -> torch.Tensor:
    """The teachers' ensemble as a retriever: over the union of each teacher's top ``depth``, each
    teacher's scores min-max normalised per query and summed with equal weights, as in training
    (where the candidates are the mined ones); documents outside the union score -inf."""
    cand = torch.zeros_like(scores[0], dtype=torch.bool)
    for s in scores:
        cand.scatter_(1, s.topk(depth, dim=-1).indices, True)
    total = torch.zeros_like(scores[0])
    for s in scores:
        lo = s.masked_fill(~cand, float("inf")).amin(1, keepdim=True)
        hi = s.masked_fill(~cand, float("-inf")).amax(1, keepdim=True)
        total += (s - lo) / (hi - lo).clamp_min(1e-9)
    return total.masked_fill(~cand, float("-inf"))


def ranked_metrics(scores: torch.Tensor, ids: list[str], qids: list[str], qrels, depth: int) -> dict[str, float]:
    """NDCG@10 and Recall@100 of the top ``depth`` documents per query by ``scores``."""
    from ranx import Run as RanxRun, evaluate

    top = scores.topk(depth, dim=-1)
    run = {qid: {ids[int(i)]: float(v) for i, v in zip(top.indices[r], top.values[r])} for r, qid in enumerate(qids)}
    return {k: float(v) for k, v in evaluate(qrels, RanxRun(run), ["ndcg@10", "recall@100"]).items()}
