"""Ranking losses over a query's candidate list, for distilling teachers into the sparse document encoder.

Scores are ``(queries, candidates)``; the positive document sits in column 0 (the layout of
``train_data.TrainExample.candidates``). ``kl``: KL from the teacher's softmax over the list to
the student's (the distillation core's ``forward_kl``); ``margin_mse``: MSE between the student's
and the teacher's positive-minus-negative margins (Hofstätter et al.); ``infonce``: cross-entropy
of the positive against every other document in the batch (teacher-free, in-batch negatives).
Multi-teacher targets come from ``distill.ensemble_scores`` (min-max per query, weighted sum, scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distill.losses import forward_kl

__all__ = ["RANKING_LOSSES", "kl_ranking_loss", "margin_mse_loss", "info_nce_loss", "ranking_loss"]

RANKING_LOSSES = ("kl", "margin_mse", "infonce")


def _check(student: Tensor, teacher: Tensor) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher scores must both be (queries, candidates); got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[1] < 2:
        raise ValueError("a ranking loss needs at least 2 candidates per query (a positive and a negative)")


def kl_ranking_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` over each candidate list, averaged over queries."""
    _check(student, teacher)
    # T^2 keeps the gradient scale independent of T, as in Hinton's KD
    return forward_kl(student.float(), teacher.float(), T=temperature)


def margin_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over (query, negative) of ``((s_pos - s_neg) - (t_pos - t_neg))^2``; column 0 is the positive."""
    _check(student, teacher)
    s, t = student.float(), teacher.detach().float()
    return F.mse_loss(s[:, :1] - s[:, 1:], t[:, :1] - t[:, 1:])


def info_nce_loss(scores: Tensor, positive: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of each row's ``positive`` column; ``scores`` (queries, documents), e.g. every document of the batch."""
    if scores.ndim != 2 or positive.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (queries, documents) and positive (queries,); got {tuple(scores.shape)} "
                         f"and {tuple(positive.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.cross_entropy(scores.float() / temperature, positive.to(scores.device))


def ranking_loss(kind: str, student: Tensor, teacher: Tensor | None = None, temperature: float = 1.0,
                 in_batch: Tensor | None = None) -> Tensor:
    """One of ``RANKING_LOSSES``. ``infonce`` uses ``in_batch`` scores (queries, queries * candidates) when
    given (the positive of query ``i`` in column ``i * candidates``), else the candidate list alone."""
    if kind == "kl":
        return kl_ranking_loss(student, teacher, temperature)
    if kind == "margin_mse":
        return margin_mse_loss(student, teacher)
    if kind == "infonce":
        n, c = student.shape
        if in_batch is None:
            return info_nce_loss(student, torch.zeros(n, dtype=torch.long), temperature)
        if in_batch.shape != (n, n * c):
            raise ValueError(f"in-batch scores must be (queries, queries * candidates) = ({n}, {n * c}), got {tuple(in_batch.shape)}")
        return info_nce_loss(in_batch, torch.arange(n) * c, temperature)
    raise ValueError(f"unknown ranking loss {kind!r}; choose from {list(RANKING_LOSSES)}")
