"""Training data for the document encoder without MS MARCO: pseudo-queries, train qrels, mined negatives.

Queries come from two places: pseudo-queries cut from documents of the training corpora
(``pseudo_queries.py``; unsupervised, the source document is the positive) and the judged queries
of a collection's *train* split (SciFact's 809 claims). Each query gets a candidate list: its
positive first, then negatives sampled from the BM25 (bm25s) top-k of its collection, merged with
any other rankings: a dense teacher's (``teachers.dense_rankings``) or the untrained student's own
(``student_rankings``: where the inference-free model errs is where a teacher can correct it).

Test queries never train anything: ``build_examples`` drops any query whose text equals a test
query of the guarded collections, and ``check_no_test_leakage`` refuses a training set in which a
test-split query id or text appears. Documents are named ``<collection>/<doc id>`` throughout.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from ..data._locate import DatasetNotFound
from ..data.beir import load_beir
from .pseudo_queries import load_documents, pseudo_queries

__all__ = ["TrainExample", "HeldOutQueries", "doc_key", "collection_name", "load_corpus", "held_out_queries", "normalize_query",
           "check_no_test_leakage", "pseudo_examples", "supervised_examples", "by_collection", "mine_candidates",
           "student_rankings", "interleave_rankings", "data_fingerprint"]


@dataclass
class TrainExample:
    qid: str  # unique within a training set
    query: str
    source: str  # "pseudo:<kind>" or "qrels:<collection>/<split>"
    collection: str  # whose documents are the candidates
    origin_qid: str = ""  # the query's id in its collection ("" for pseudo-queries)
    positives: list[str] = field(default_factory=list)  # document keys
    candidates: list[str] = field(default_factory=list)  # positives[0], then negatives


def doc_key(collection: str, doc_id: str) -> str:
    return f"{collection}/{doc_id}"


def collection_name(name_or_path: str | Path) -> str:
    return Path(name_or_path).name


def load_corpus(name_or_path: str | Path) -> dict[str, str]:
    """``doc key -> "title text"`` (the text ``load_beir`` and the evaluation encode)."""
    c = collection_name(name_or_path)
    return {doc_key(c, i): f"{t} {x}".strip() for i, (t, x) in load_documents(name_or_path).items()}


def normalize_query(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class HeldOutQueries:
    """The test-split query ids (per collection) and texts (normalised) that training must not see."""

    ids: dict[str, set[str]]
    texts: set[str]

    def __contains__(self, query: str) -> bool:
        return normalize_query(query) in self.texts


def held_out_queries(collections: Sequence[str | Path], split: str = "test") -> HeldOutQueries:
    ids: dict[str, set[str]] = {}
    texts: set[str] = set()
    for name in dict.fromkeys(collections):
        try:
            c = load_beir(name, split=split)
        except DatasetNotFound as e:
            if "no corpus.jsonl" in str(e):
                raise
            continue  # no test split: nothing to guard
        ids[collection_name(name)] = set(c.qrels)
        texts |= {normalize_query(c.queries[q]) for q in c.qrels if q in c.queries}
    return HeldOutQueries(ids, texts)


def check_no_test_leakage(examples: Sequence[TrainExample], guard: HeldOutQueries) -> None:
    """Raise if a test-split query (by id in its collection, or by text anywhere) is among the training queries."""
    for ex in examples:
        if ex.origin_qid and ex.origin_qid in guard.ids.get(ex.collection, ()):
            raise ValueError(f"test-split query {ex.collection}/{ex.origin_qid} is in the training data ({ex.source})")
        if ex.query in guard:
            raise ValueError(f"training query {ex.qid} ({ex.source}) has the text of a test query: {ex.query[:80]!r}")


def pseudo_examples(name_or_path: str | Path, max_docs: int, kinds: Sequence[str], seed: int, guard: HeldOutQueries,
                    min_words: int = 4, max_words: int = 24) -> tuple[list[TrainExample], int]:
    """Pseudo-queries from ``max_docs`` documents (0 = all) drawn with ``seed``; returns them and how many were dropped as test-query look-alikes."""
    c = collection_name(name_or_path)
    docs = load_documents(name_or_path)
    ids = sorted(docs)
    if 0 < max_docs < len(ids):
        ids = sorted(random.Random(f"{seed}:{c}").sample(ids, max_docs))
    out, dropped = [], 0
    for pq in pseudo_queries({i: docs[i] for i in ids}, kinds, seed, min_words, max_words):
        if pq.text in guard:
            dropped += 1
            continue
        out.append(TrainExample(f"pseudo/{c}/{pq.doc_id}/{pq.kind}", pq.text, f"pseudo:{pq.kind}", c, "", [doc_key(c, pq.doc_id)]))
    return out, dropped


def supervised_examples(name_or_path: str | Path, max_queries: int, seed: int, guard: HeldOutQueries,
                        split: str = "train") -> tuple[list[TrainExample], int]:
    """The judged queries of ``split`` (never 'test'), ``max_queries`` of them (0 = all)."""
    if split == "test":
        raise ValueError("test qrels never train anything; use a train split (e.g. scifact 'train')")
    col = load_beir(name_or_path, split=split)
    c = collection_name(name_or_path)
    qids = sorted(q for q, rel in col.qrels.items() if q in col.queries and any(g > 0 for g in rel.values()))
    if 0 < max_queries < len(qids):
        qids = sorted(random.Random(f"{seed}:{c}:{split}").sample(qids, max_queries))
    out, dropped = [], 0
    for q in qids:
        if col.queries[q] in guard or q in guard.ids.get(c, ()):
            dropped += 1
            continue
        pos = sorted(doc_key(c, d) for d, g in col.qrels[q].items() if g > 0)
        out.append(TrainExample(f"{c}/{split}/{q}", col.queries[q], f"qrels:{c}/{split}", c, q, pos))
    return out, dropped


def by_collection(examples: Sequence[TrainExample], corpus: Mapping[str, str]) -> Iterator[tuple[str, list[TrainExample], list[str]]]:
    """``(collection, its examples, its document keys sorted)`` for each collection the examples query."""
    groups: dict[str, list[TrainExample]] = {}
    for ex in examples:
        groups.setdefault(ex.collection, []).append(ex)
    for col, exs in groups.items():
        yield col, exs, sorted(k for k in corpus if k.startswith(col + "/"))


def student_rankings(encoder, examples: Sequence[TrainExample], corpus: Mapping[str, str], depth: int, batch_size: int = 32,
                     progress: bool = False) -> dict[str, list[str]]:
    """Each query's top-``depth`` documents of its collection by the inference-free student as it is.

    ``encoder`` is a ``SparseDocEncoder`` (put it in eval mode); queries are token IDF weights from the query's own
    collection, as at evaluation. Every document of each collection involved is encoded once.
    """
    import torch
    from tqdm.auto import tqdm

    from .encoders import QueryEncoder
    from .idf import IDFTable

    out: dict[str, list[str]] = {}
    for col, exs, keys in by_collection(examples, corpus):
        texts = [corpus[k] for k in keys]
        qenc = QueryEncoder(encoder.tokenizer, IDFTable.from_corpus(texts, encoder.tokenizer))
        docs = []
        with torch.no_grad():
            for s in tqdm(range(0, len(texts), batch_size), desc=f"student encodes {col}", disable=not progress, leave=False):
                docs.append(encoder(texts[s : s + batch_size]).float().cpu().to_sparse())
        d = torch.cat(docs)
        for s in range(0, len(exs), 256):
            q = qenc([ex.query for ex in exs[s : s + 256]])
            top = torch.sparse.mm(d, q.T).T.topk(min(depth, len(keys)), dim=-1).indices
            for ex, row in zip(exs[s : s + 256], top.tolist()):
                out[ex.qid] = [keys[i] for i in row]
    return out


def interleave_rankings(*rankings: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """One ranking per query id: the given rankings taken in turns, repeats dropped."""
    given = [r for r in rankings if r]
    qids = dict.fromkeys(q for r in given for q in r)
    return {q: _interleave(*(r.get(q, []) for r in given)) for q in qids}


def _interleave(*lists: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(x for tier in zip_longest(*lists) for x in tier if x))


def mine_candidates(examples: list[TrainExample], corpus: Mapping[str, str], n_candidates: int, bm25_depth: int, seed: int,
                    extra_rankings: Mapping[str, Sequence[str]] | None = None, progress: bool = False) -> None:
    """Fill each example's ``candidates``: its first positive, then ``n_candidates - 1`` negatives.

    Negatives are sampled (seeded by ``seed`` and the query id) from the BM25 top-``bm25_depth`` of
    the query's collection (0: no BM25) merged with ``extra_rankings[qid]`` (e.g. a dense teacher's
    top-k), positives excluded; a short pool is topped up with random documents of the collection.
    """
    from .bm25 import import_bm25s

    bm25s = import_bm25s()
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2 (a positive and a negative), got {n_candidates}")
    for c, exs, keys in by_collection(examples, corpus):
        if len(keys) < n_candidates:
            raise ValueError(f"collection {c} has {len(keys)} documents, fewer than {n_candidates} candidates per query")
        res = [[] for _ in exs]
        if bm25_depth > 0:
            bm = bm25s.BM25()
            bm.index(bm25s.tokenize([corpus[k] for k in keys], stopwords="en", show_progress=False), show_progress=progress)
            res, _ = bm.retrieve(bm25s.tokenize([ex.query for ex in exs], stopwords="en", show_progress=False),
                                 k=min(bm25_depth, len(keys)), show_progress=progress, n_threads=1)
        for ex, row in zip(exs, res):
            ranked = [keys[int(i)] for i in row]
            extra = (extra_rankings or {}).get(ex.qid, [])
            pos = set(ex.positives)
            pool = [k for k in _interleave(ranked, extra) if k not in pos]
            rng = random.Random(f"{seed}:{ex.qid}")
            need = n_candidates - 1
            negs = rng.sample(pool, need) if len(pool) >= need else pool + rng.sample([k for k in keys if k not in pos and k not in pool],
                                                                                         need - len(pool))
            ex.candidates = [ex.positives[0], *negs]


def data_fingerprint(examples: Sequence[TrainExample], corpus: Mapping[str, str]) -> str:
    """Hash of every query and candidate text: equal fingerprints mean equal teacher inputs."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.qid, ex.query, [[k, hashlib.sha1(corpus[k].encode()).hexdigest()] for k in ex.candidates]]).encode())
    return h.hexdigest()[:20]
