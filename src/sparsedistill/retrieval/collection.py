"""A collection into a ``SparseIndex``: resumable chunked encoding, the index, and its IDF table.

``build_collection_index`` encodes a BEIR-layout corpus with ``SparseDocEncoder`` into chunk files
(``<index>/chunks/chunk-*.npz``, float CSR rows, each written atomically), so a killed run picks up
at the first missing chunk; then adds every chunk not yet in the index (one atomic segment each),
compacts to one segment, and writes ``idf.json`` for the query side (times the encoder's learned
query-term weights, ``query_weights.json``, when it has them: the index's one effective table). ``open_collection_index`` gives
back what ``retrieval search`` needs: the index, the query encoder and, if found, the corpus;
``query_encoder_for`` the query side alone (the HTTP service's default).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.beir import BeirCollection, load_beir
from ..files import sha256_file
from ..runs import atomic_write_bytes
from .idf import INDEX_IDF_FILE
from .lexical import SUPPORTS, blend_documents, lexical_impacts
from .term_weights import QueryTermWeights

__all__ = ["build_collection_index", "open_collection_index", "query_encoder_for", "weights_sha256"]


def _collection_ref(collection: str) -> str:
    """What the index records to find the corpus again: a folder's absolute path, or a collection name."""
    p = Path(collection)
    return str(p.resolve()) if p.is_dir() else collection


def weights_sha256(model_dir: Path) -> str:
    """A short fingerprint of an encoder folder's weight files (what its document vectors depend on)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt"):  # not query_weights.json: it changes idf.json, not the chunks
            sha256_file(f, into=h)
    return h.hexdigest()[:16]


def _save_chunk(path: Path, rows: torch.Tensor) -> None:
    csr = rows.to_sparse_csr()
    buf = io.BytesIO()
    np.savez(buf, indptr=csr.crow_indices().numpy(), indices=csr.col_indices().numpy().astype(np.int32),
             data=csr.values().float().numpy(), shape=np.array(rows.shape))
    atomic_write_bytes(path, buf.getvalue())


def _torch_sparse(m) -> torch.Tensor:
    """A scipy CSR matrix as a torch COO tensor."""
    m = m.tocoo()
    return torch.sparse_coo_tensor(np.vstack([m.row, m.col]), m.data, m.shape).coalesce()


def _load_chunk(path: Path):
    import scipy.sparse as sp

    with np.load(path) as z:
        return sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))


def build_collection_index(collection: str, index_dir: Path, encoder: str = "", max_length: int = 256,
                           batch_size: int = 32, chunk_docs: int = 512, progress: bool = True,
                           lexical_weight: float = 0.0, lexical_support: str = "union"):
    """Encode (resumably) and index ``collection`` (a name under the IR data root, or a BEIR folder). With
    ``lexical_weight`` > 0 each document is indexed as its vector plus that weight times BM25 impacts of its own
    tokens (``retrieval/lexical.py``; ``retrieval blend`` chooses the weight), on the ``lexical_support``."""
    from .encoders import SparseDocEncoder, splade_tiny_path
    from .idf import IDFTable, tokenizer_fingerprint
    from .index import MANIFEST, SparseIndex

    if lexical_support not in SUPPORTS or lexical_weight < 0:
        raise ValueError(f"lexical weight must be >= 0 and its support one of {SUPPORTS}, got {lexical_weight}, {lexical_support!r}")
    c = load_beir(collection)
    ids = list(c.corpus)
    texts = [c.corpus[i] for i in ids]
    encoder_path = Path(encoder) if encoder else splade_tiny_path()
    doc_encoder = SparseDocEncoder(encoder_path, max_length=max_length).eval()
    chunk_dir = index_dir / "chunks"
    meta = {"collection": _collection_ref(collection), "docs": len(ids),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16], "encoder": str(encoder_path.resolve()),
            "encoder_weights_sha256": weights_sha256(encoder_path), "max_length": max_length, "chunk_docs": chunk_docs}
    meta_file = chunk_dir / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old != meta:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            raise ValueError(f"{chunk_dir} holds vectors encoded with other settings ({', '.join(diff)} differ); "
                             "delete that folder or choose another --index-dir")
    else:
        atomic_write_bytes(meta_file, json.dumps(meta, indent=1).encode())

    # 1. encode, one chunk file at a time; existing chunks are the finished part of an earlier run
    starts = list(range(0, len(ids), chunk_docs))
    chunk_file = lambda i: chunk_dir / f"chunk-{i:05d}.npz"  # noqa: E731
    done = sum(min(chunk_docs, len(ids) - s) for i, s in enumerate(starts) if chunk_file(i).exists())
    bar = tqdm(total=len(ids), initial=done, desc=f"encode {c.name}", unit="doc", disable=not progress)
    with torch.no_grad():
        for i, s in enumerate(starts):
            if chunk_file(i).exists():
                continue
            part = texts[s:s + chunk_docs]
            rows = []
            for b in range(0, len(part), batch_size):
                rows.append(doc_encoder(part[b:b + batch_size]).to_sparse())
                bar.update(len(part[b:b + batch_size]))
            _save_chunk(chunk_file(i), torch.cat(rows))
    bar.close()

    # 2. index every chunk not in the index yet (each add is one atomic segment), then one segment
    tok = doc_encoder.tokenizer
    lexical = {"weight": lexical_weight, "support": lexical_support, "k1": 1.2, "b": 0.75} if lexical_weight else None
    if (index_dir / MANIFEST).exists():
        index = SparseIndex.open(index_dir)
        index.check_tokenizer(tok)
        if (had := index.metadata.get("lexical")) != lexical:
            index.close()
            raise ValueError(f"{index_dir} was indexed with lexical impacts {had}, not {lexical}; "
                             "delete its index files (keep chunks/: the encoded vectors are reused) or choose another --index-dir")
    else:
        index = SparseIndex.create(index_dir, doc_encoder.vocab_size, tokenizer_fingerprint(tok),
                                   metadata={**{k: meta[k] for k in ("collection", "encoder", "max_length")}, "lexical": lexical})
    impacts = (lexical_impacts(texts, tok, doc_encoder.vocab_size, lexical["k1"], lexical["b"]) if lexical else None)
    for i, s in enumerate(tqdm(starts, desc="index", unit="chunk", disable=not progress)):
        chunk_ids = ids[s:s + chunk_docs]
        new = [r for r, d in enumerate(chunk_ids) if d not in index]
        if new:
            vectors = _load_chunk(chunk_file(i))[new]
            if impacts is not None:
                rows = torch.tensor([s + r for r in new])
                vectors = blend_documents(_torch_sparse(vectors), impacts.index_select(0, rows), lexical_weight, lexical_support)
            index.add([chunk_ids[r] for r in new], vectors)
    index.compact()

    # 3. the query side: IDF from this corpus with the encoder's tokenizer, times its learned term weights if any
    # (rewritten on every run, so weights learned after the documents were indexed reach the index)
    idf = IDFTable.from_corpus(texts, tok)
    weights = QueryTermWeights.find(encoder_path, tok)
    (weights.apply(idf) if weights is not None else idf).save(index_dir / INDEX_IDF_FILE)
    return index


def query_encoder_for(index: Any, index_dir: Path, tokenizer_path: Path | None = None) -> Any:
    """The query side of an index built by ``build_collection_index``: its tokenizer (``tokenizer_path``, else the
    encoder the index records, else SPLADE-tiny's) and its IDF table, checked against the index's tokenizer."""
    from transformers import AutoTokenizer

    from .encoders import QueryEncoder, splade_tiny_path
    from .idf import IDFTable

    idf_file = Path(index_dir) / INDEX_IDF_FILE
    if not idf_file.exists():
        raise FileNotFoundError(f"{idf_file} is missing: the query side needs it; rerun `sparsedistill retrieval index` "
                                "(it writes the corpus's IDF, times the encoder's query_weights.json if any) or save an IDFTable there")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path or index.metadata.get("encoder") or splade_tiny_path()))
    index.check_tokenizer(tok)
    return QueryEncoder(tok, IDFTable.load(idf_file, tok))


def open_collection_index(index_dir: Path, verify: bool = True) -> tuple[Any, Any, BeirCollection | None]:
    """``(index, query_encoder, corpus or None)`` for an index built by ``build_collection_index``."""
    from ..data import DatasetNotFound
    from .index import SparseIndex

    index = SparseIndex.open(index_dir, verify=verify)
    query_encoder = query_encoder_for(index, index_dir)
    corpus = None
    if index.metadata.get("collection"):
        try:
            corpus = load_beir(index.metadata["collection"])
        except (DatasetNotFound, FileNotFoundError):
            pass
    return index, query_encoder, corpus
