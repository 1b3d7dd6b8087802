"""Document vectors out to the engines that serve learned sparse retrieval elsewhere.

- OpenSearch neural sparse search: ``_bulk`` NDJSON (an action line, then a source line with a
  ``rank_features`` field ``{token: weight}``), the index mapping, and the IDF file that its
  inference-free query side reads (``IDFTable.to_opensearch``).
- Anserini's ``JsonVectorCollection``: JSON lines ``{"id", "contents", "vector": {token: weight}}``,
  weights usually quantized to integers (``round(100 * w)``), indexed with ``-impact -pretokenized``.

Tokens are the document encoder's vocabulary strings. Writers stream: one document in memory at a
time, into a temporary file that is fsynced and renamed over the target only when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..runs import atomic_open, atomic_write_bytes

__all__ = ["token_strings", "documents_from_matrix", "opensearch_mapping", "write_opensearch_bulk",
           "write_opensearch_idf", "write_anserini_vectors"]

Document = tuple[str, np.ndarray, np.ndarray]  # (doc id, term ids, weights)


def token_strings(tokenizer) -> list[str]:
    """The token string of every id, ``[id] -> token`` (a Hugging Face tokenizer's vocabulary)."""
    vocab = tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    missing = [i for i, t in enumerate(tokens) if not t]
    if missing:
        raise ValueError(f"the tokenizer's vocabulary has no token for ids {missing[:5]}; cannot name every dimension")
    return tokens


def documents_from_matrix(doc_ids: Sequence[str], vectors: Any) -> Iterator[Document]:
    """``(doc_id, term_ids, weights)`` per row of a (docs, vocab) matrix (torch dense/COO/CSR, numpy, scipy)."""
    from .index import document_csr

    vocab = vectors.shape[1]
    indptr, indices, data, rows = document_csr(vectors, vocab)
    if rows != len(doc_ids):
        raise ValueError(f"{len(doc_ids)} document ids for {rows} vectors")
    for r, doc_id in enumerate(doc_ids):
        yield doc_id, indices[indptr[r]:indptr[r + 1]], data[indptr[r]:indptr[r + 1]]


def _token_weights(tokens: Sequence[str], term_ids: np.ndarray, weights: np.ndarray, quantize: float | None) -> dict[str, float | int]:
    if len(term_ids) and int(np.max(term_ids)) >= len(tokens):
        raise ValueError(f"term id {int(np.max(term_ids))} is outside the tokenizer's vocabulary ({len(tokens)} tokens)")
    out: dict[str, float | int] = {}
    if quantize is None:
        for t, w in zip(term_ids.tolist(), np.asarray(weights, dtype=np.float64).tolist()):
            w = float(f"{w:.6g}")  # float32 precision; OpenSearch keeps 9 significant bits anyway
            if w > 0:  # rank_features and impacts need strictly positive values
                out[tokens[t]] = w
    else:
        for t, w in zip(term_ids.tolist(), np.rint(np.asarray(weights, dtype=np.float64) * quantize).astype(np.int64).tolist()):
            if w > 0:
                out[tokens[t]] = w
    return out


def opensearch_mapping(field: str = "passage_embedding", text_field: str | None = "passage_text", id_field: str = "id") -> dict:
    """Index body for ``PUT <index>``: the sparse field as ``rank_features`` (what neural sparse search queries)."""
    props: dict[str, Any] = {id_field: {"type": "keyword"}, field: {"type": "rank_features"}}
    if text_field:
        props[text_field] = {"type": "text"}
    return {"settings": {"index": {"number_of_shards": 1, "number_of_replicas": 0}}, "mappings": {"properties": props}}


def write_opensearch_bulk(documents: Iterable[Document], out: str | os.PathLike, tokens: Sequence[str], index_name: str,
                          field: str = "passage_embedding", texts: Mapping[str, str] | None = None,
                          text_field: str = "passage_text", id_field: str = "id") -> int:
    """Write ``_bulk`` NDJSON (``POST _bulk --data-binary @out``); returns the number of documents.

    Each document: ``{"index": {"_index", "_id"}}`` then ``{"id": ..., field: {token: weight}}`` (plus
    ``text_field`` when ``texts`` has the document). Zero weights are left out.
    """
    n = 0
    with atomic_open(Path(out), "w") as f:
        for doc_id, term_ids, weights in documents:
            source: dict[str, Any] = {id_field: doc_id, field: _token_weights(tokens, term_ids, weights, None)}
            if texts is not None and doc_id in texts:
                source[text_field] = texts[doc_id]
            f.write(json.dumps({"index": {"_index": index_name, "_id": doc_id}}, ensure_ascii=False) + "\n")
            f.write(json.dumps(source, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_opensearch_idf(idf, tokenizer, out: str | os.PathLike) -> None:
    """The ``{token: idf}`` JSON file that OpenSearch's inference-free query side weighs query tokens by."""
    atomic_write_bytes(Path(out), json.dumps(idf.to_opensearch(tokenizer), ensure_ascii=False).encode())


def write_anserini_vectors(documents: Iterable[Document], out: str | os.PathLike, tokens: Sequence[str],
                           quantize: float | None = 100.0, texts: Mapping[str, str] | None = None) -> int:
    """Write Anserini ``JsonVectorCollection`` JSON lines; returns the number of documents.

    ``quantize``: weights become ``round(quantize * w)`` integers (Anserini's impact indexes take
    integer term frequencies; 100 is its SPLADE convention), weights that round to 0 are left out;
    ``None`` keeps floats. ``contents`` is the document's text from ``texts`` or "".
    """
    n = 0
    with atomic_open(Path(out), "w") as f:
        for doc_id, term_ids, weights in documents:
            row = {"id": doc_id, "contents": (texts or {}).get(doc_id, ""),
                   "vector": _token_weights(tokens, term_ids, weights, quantize)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
