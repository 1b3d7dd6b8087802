"""Document vectors, and the retrieval model itself, out to the engines and libraries that serve learned sparse retrieval.

- OpenSearch neural sparse search: ``_bulk`` NDJSON (an action line, then a source line with a
  ``rank_features`` field ``{token: weight}``), the index mapping, and the IDF file that its
  inference-free query side reads (``IDFTable.to_opensearch``).
- Anserini's ``JsonVectorCollection``: JSON lines ``{"id", "contents", "vector": {token: weight}}``,
  weights usually quantized to integers (``round(100 * w)``), indexed with ``-impact -pretokenized``.
- sentence-transformers' ``SparseEncoder``: the model, not its vectors (``save_sentence_transformers``),
  a folder whose document route is the SPLADE encoder and whose query route is the IDF table, so
  users of that library encode both sides with no code of ours.

Tokens are the document encoder's vocabulary strings. Writers stream: one document in memory at a
time, into a temporary file that is fsynced and renamed over the target only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..runs import atomic_open, atomic_write_bytes

if TYPE_CHECKING:
    from .encoders import SparseDocEncoder
    from .idf import IDFTable

__all__ = ["token_strings", "documents_from_matrix", "opensearch_mapping", "write_opensearch_bulk",
           "write_opensearch_idf", "write_anserini_vectors", "save_sentence_transformers"]

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


def _check_model_folder(folder: Path) -> None:
    """A Hugging Face model folder with a config and weights, or a clear error naming what is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"the document encoder folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder} has no model weights (*.safetensors or *.bin)")


def _check_replaceable(out: Path) -> None:
    """Only an empty folder or an earlier sentence-transformers export may be replaced: never a user's other files."""
    if out.is_file():
        raise FileExistsError(f"{out} is a file; the sentence-transformers export is a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "modules.json").is_file():
        raise FileExistsError(f"{out} is a non-empty folder that is not a sentence-transformers model; "
                              "choose another output folder or empty it")


def save_sentence_transformers(encoder: SparseDocEncoder | str | os.PathLike, idf: IDFTable, out_dir: str | os.PathLike,
                               max_length: int | None = None, query_max_length: int = 512) -> Path:
    """Write the retrieval model as a folder that ``sentence_transformers.SparseEncoder(out_dir)`` loads as is.

    ``encoder``: a ``SparseDocEncoder`` or its Hugging Face masked-LM folder; ``idf``: the query side's
    ``IDFTable`` (an index's ``idf.json``), built with that encoder's tokenizer. The folder holds a
    ``Router``: ``encode_document`` runs the masked LM (``Transformer``, fill-mask) and ``SpladePooling``
    (max over tokens of ``log(1 + ReLU(logits))``, padding masked), truncating at ``max_length`` tokens
    (default: the encoder's ``max_length``, else 256 like ``retrieval index``); ``encode_query`` is a
    ``SparseStaticEmbedding`` holding the IDF weight of every vocabulary token (special tokens 0), fed
    the query's tokens without special tokens, truncated at ``query_max_length`` (``QueryEncoder``'s 512).
    Similarity is the dot product, the index's score. Returns ``out_dir``.

    Differences from our encoders that the sentence-transformers modules cannot express:

    - a query token that occurs twice counts twice in ``QueryEncoder`` (count x IDF) but once in
      ``SparseStaticEmbedding`` (presence x IDF): queries without repeated tokens get identical vectors;
    - ``SparseDocEncoder.prune_below`` has no counterpart, so such an encoder is refused; its
      ``max_terms`` becomes the model's ``max_active_dims``, which sentence-transformers also applies to
      query vectors (only a query with more than ``max_terms`` distinct tokens is affected);
    - sentence-transformers batches documents by length, so document weights differ from ours by float
      rounding (~1e-6), which can move a weight that is all but 0 between 0 and a tiny positive value.

    Written into a temporary folder beside ``out_dir`` and renamed over it when complete; an existing
    ``out_dir`` is replaced only if it is empty or an earlier sentence-transformers model. Needs
    ``sentence-transformers>=6`` (a model saved by it loads with 6.x).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .encoders import SparseDocEncoder

    out = Path(out_dir)
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")
    if query_max_length <= 0:
        raise ValueError(f"query_max_length must be > 0, got {query_max_length}")
    max_terms = 0
    if isinstance(encoder, SparseDocEncoder):
        if encoder.prune_below > 0:
            raise ValueError(f"this encoder prunes weights below {encoder.prune_below}, which sentence-transformers "
                             "cannot express; export it with prune_below=0 (prune the index instead)")
        max_terms, max_length = encoder.max_terms, max_length or encoder.max_length
    else:
        _check_model_folder(Path(encoder))
        max_length = max_length or 256  # SparseDocEncoder's and `retrieval index`'s default
    _check_replaceable(out)
    try:
        from sentence_transformers import SparseEncoder
        from sentence_transformers.sparse_encoder.modules import Router, SparseStaticEmbedding, SpladePooling, Transformer
    except ImportError as e:
        raise ImportError(f"the sentence-transformers export needs that library ({e}): pip install 'sentence-transformers>=6'") from e

    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # beside out_dir: the rename stays on one file system
    shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier export's leftovers
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if isinstance(encoder, SparseDocEncoder):  # sentence-transformers loads modules from folders only
                src = Path(scratch)
                encoder.mlm.save_pretrained(str(src))
                encoder.tokenizer.save_pretrained(str(src))
            else:
                src = Path(encoder)
            tokenizer = AutoTokenizer.from_pretrained(str(src))
            vocab = len(tokenizer.get_vocab())
            model_vocab = AutoConfig.from_pretrained(str(src)).vocab_size
            if idf.weights.numel() != vocab:
                raise ValueError(f"the IDF table has {idf.weights.numel()} weights but the tokenizer {vocab} tokens: "
                                 "it was built with another vocabulary")
            if model_vocab != vocab:  # the query route's width is the tokenizer's, the document route's the model's
                raise ValueError(f"the model's vocab_size is {model_vocab} but its tokenizer has {vocab} tokens; "
                                 "query and document vectors would not share dimensions")
            idf.check(tokenizer)

            document = Transformer(str(src), transformer_task="fill-mask", max_seq_length=max_length)
            # its own tokenizer copy: the query side truncates at another length than the document side
            query_tokenizer = AutoTokenizer.from_pretrained(str(src), model_max_length=query_max_length)
            query = SparseStaticEmbedding(query_tokenizer, weight=idf.weights.detach().clone().float(), frozen=True)
            router = Router.for_query_document(
                query_modules=[query],
                document_modules=[document, SpladePooling("max", activation_function="relu", embedding_dimension=vocab)])
            model = SparseEncoder(modules=[router], similarity_fn_name="dot", max_active_dims=max_terms or None, device="cpu")
            model.save(str(staging))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
