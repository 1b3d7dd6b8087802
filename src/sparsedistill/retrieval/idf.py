"""IDF tables: the whole query-side "model" of inference-free sparse retrieval.

Built from any corpus with the document encoder's tokenizer (``idf(t) = log(1 + (N - df + 0.5) /
(df + 0.5))``, BM25's), special tokens at 0. Saved as JSON with a fingerprint of the tokenizer's
vocabulary, so a table is never used with another tokenizer; also written and read in the flat
``{token: weight}`` JSON that OpenSearch's neural sparse search takes as its IDF file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..runs import atomic_write_bytes

__all__ = ["IDFTable", "tokenizer_fingerprint", "INDEX_IDF_FILE"]

INDEX_IDF_FILE = "idf.json"  # an index directory's query-side IDF table (written by `retrieval index`, read by the service)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


class IDFTable:
    def __init__(self, weights: Tensor, fingerprint: str) -> None:
        self.weights = weights.float()  # (vocab,)
        self.fingerprint = fingerprint

    @classmethod
    def from_corpus(cls, texts: Iterable[str], tokenizer, batch: int = 1024) -> "IDFTable":
        df: Counter[int] = Counter()
        n = 0
        texts = list(texts)
        for s in range(0, len(texts), batch):
            for ids in tokenizer(texts[s : s + batch], add_special_tokens=False)["input_ids"]:
                df.update(set(ids))
                n += 1
        if n == 0:
            raise ValueError("cannot build an IDF table from an empty corpus")
        w = torch.zeros(len(tokenizer.get_vocab()))
        for t, d in df.items():
            w[t] = math.log(1 + (n - d + 0.5) / (d + 0.5))
        w[torch.tensor(tokenizer.all_special_ids, dtype=torch.long)] = 0.0
        return cls(w, tokenizer_fingerprint(tokenizer))

    def check(self, tokenizer) -> None:
        if tokenizer_fingerprint(tokenizer) != self.fingerprint:
            raise ValueError("this IDF table was built with another tokenizer (vocabulary fingerprint differs); "
                             "rebuild it with IDFTable.from_corpus(texts, tokenizer)")

    def save(self, path: str | Path) -> None:
        data = {"fingerprint": self.fingerprint, "weights": self.weights.tolist()}
        atomic_write_bytes(Path(path), json.dumps(data).encode())

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> "IDFTable":
        data = json.loads(Path(path).read_text())
        if "weights" not in data:
            if tokenizer is None:
                raise ValueError(f"{path} is an OpenSearch-style token->weight file; pass the tokenizer to read it")
            return cls.from_opensearch(data, tokenizer)
        table = cls(torch.tensor(data["weights"]), data["fingerprint"])
        if tokenizer is not None:
            table.check(tokenizer)
        return table

    def to_opensearch(self, tokenizer) -> dict[str, float]:
        """``{token: idf}`` for the nonzero entries (OpenSearch neural sparse's IDF file)."""
        self.check(tokenizer)
        inv = {i: t for t, i in tokenizer.get_vocab().items()}
        nz = torch.nonzero(self.weights).flatten().tolist()
        return {inv[i]: float(self.weights[i]) for i in nz}

    @classmethod
    def from_opensearch(cls, data: dict[str, float], tokenizer) -> "IDFTable":
        vocab = tokenizer.get_vocab()
        unknown = [t for t in data if t not in vocab]
        if unknown:
            raise ValueError(f"{len(unknown)} IDF tokens are not in this tokenizer's vocabulary (e.g. {unknown[:3]}): "
                             "the file belongs to another tokenizer")
        w = torch.zeros(len(vocab))
        for t, v in data.items():
            w[vocab[t]] = v
        return cls(w, tokenizer_fingerprint(tokenizer))
