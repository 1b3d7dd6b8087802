"""FLOPS regularisers on sparse document vectors: the plain one and an IDF-aware one.

Plain FLOPS (Paria et al.): ``sum_j (mean_i w_ij)^2`` over the vocabulary, the expected number of
multiply-adds of a query-document dot product. IDF-aware: each term's mean activation is divided
by ``1 + idf_j``, so frequent (low-IDF) terms, which an IDF-weighted query barely rewards, are
pushed out hardest (the variant as issue #6 describes the paper's). The paper's own method appears
to be the plain term with IDF-weighted queries in the ranking loss, which already makes a low-IDF
term cost more per unit of score (README, "What the paper's IDF-aware penalty is").
``threshold``: only documents with more nonzeros than it are penalised.

Under ``torchrun`` the mean runs over the global batch, every rank's documents, not each rank's
share: a per-rank FLOPS term penalises a different, noisier quantity (the square of a smaller
batch's mean) and is what makes documents 2-4x denser on several GPUs in public trainers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["flops_loss", "flops_weight"]


def flops_loss(doc_vectors: Tensor, idf: Tensor | None = None, threshold: int = 0, across_ranks: bool = True) -> Tensor:
    """``doc_vectors`` (batch, vocab) >= 0; ``idf`` (vocab,) switches on the IDF-aware form.

    ``across_ranks``: under a process group, average over the global batch (set False only to
    reproduce the per-rank behaviour of other trainers).
    """
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
    if not (across_ranks and dist.is_initialized() and dist.get_world_size() > 1):
        return (w.mean(0) ** 2).sum()
    return _global_flops(w)


def _global_flops(w: Tensor) -> Tensor:
    """``sum_j (mean over every rank's documents of w_ij)^2``, with the gradient DDP's averaging expects.

    The value is the global FLOPS. The gradient on this rank's documents is world_size x the
    single-process one, because DDP divides the summed gradients by world_size.
    """
    local_sum = w.sum(0)
    stats = torch.cat([local_sum.detach(), w.new_tensor([w.shape[0]])])
    dist.all_reduce(stats)
    global_sum, n = stats[:-1], stats[-1]
    value = ((global_sum / n) ** 2).sum()
    # d value / d local_sum = 2 global_sum / n^2; times world_size for DDP's mean over ranks
    surrogate = (local_sum * (2 * dist.get_world_size() * global_sum / n**2)).sum()
    return value + surrogate - surrogate.detach()


def flops_weight(step: int, max_weight: float, ramp_steps: int) -> float:
    """The FLOPS weight at ``step``: quadratic ramp from 0 to ``max_weight`` over ``ramp_steps``."""
    if ramp_steps <= 0:
        return max_weight
    return max_weight * min(1.0, (step / ramp_steps)) ** 2
