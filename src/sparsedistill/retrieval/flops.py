"""FLOPS regularisers on sparse document vectors: the plain one and the IDF-aware one of the paper.

Plain FLOPS (Paria et al.): ``sum_j (mean_i w_ij)^2`` over the vocabulary, the expected number of
multiply-adds of a query-document dot product. IDF-aware: each term's mean activation is divided
by ``1 + idf_j``, so frequent (low-IDF) terms, which an IDF-weighted query barely rewards, are
pushed out hardest (the variant as issue #6 describes the paper's; the exact weighting should be
checked against the paper before numbers are compared with it). ``threshold``: only documents with
more nonzeros than it are penalised.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["flops_loss", "flops_weight"]


def flops_loss(doc_vectors: Tensor, idf: Tensor | None = None, threshold: int = 0) -> Tensor:
    """``doc_vectors`` (batch, vocab) >= 0; ``idf`` (vocab,) switches on the IDF-aware form."""
    if doc_vectors.ndim != 2:
        raise ValueError(f"expected document vectors (batch, vocab), got {tuple(doc_vectors.shape)}")
    w = doc_vectors
    if threshold:
        w = w * ((w > 0).sum(-1, keepdim=True) > threshold)
    if idf is not None:
        if idf.shape != (w.shape[1],):
            raise ValueError(f"idf must be (vocab,) = ({w.shape[1]},), got {tuple(idf.shape)}")
        # a term's penalty shrinks as its IDF grows: rare terms are cheap, frequent ones expensive
        w = w / (1.0 + idf.to(w.device, w.dtype))
    return (w.mean(0) ** 2).sum()


def flops_weight(step: int, max_weight: float, ramp_steps: int) -> float:
    """The FLOPS weight at ``step``: quadratic ramp from 0 to ``max_weight`` over ``ramp_steps``."""
    if ramp_steps <= 0:
        return max_weight
    return max_weight * min(1.0, (step / ramp_steps)) ** 2
