"""Teacher access modes: what a student can learn from when it cannot see full logits.

* ``full``: the teacher's logits (``losses.forward_kl``).
* ``topk``: only the k largest teacher probabilities, renormalised (what an API or a cache
  returns); stored as ``(indices, log_probs)``.
* ``sampled``: a few classes drawn from the softened teacher distribution; the mean of
  ``log p_i - log q_i`` over the draws is an unbiased estimate of ``KL(p || q)`` and of its gradient.
* ``hard``: the teacher's predicted labels only (a text-only teacher); for sequences this is
  sequence-level KD, cross-entropy on the teacher's generated tokens.

All sparse targets share one container and one loss, ``sparse_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import Operator, check_logits, forward_kl, soften_log_probs, t2_factor
from .softening import check_temperature, get_operator

__all__ = [
    "TeacherMode",
    "SparseTargets",
    "topk_targets",
    "truncated_targets",
    "sampled_targets",
    "hard_targets",
    "sparse_kl",
    "hard_label_loss",
    "distill_loss",
]

TeacherMode = Literal["full", "topk", "sampled", "hard"]
TEACHER_MODES: tuple[str, ...] = ("full", "topk", "sampled", "hard")


@dataclass
class SparseTargets:
    """Per position: ``k`` class indices, the teacher's log-probabilities there, and each entry's weight.

    ``weights`` are the renormalised probabilities for top-k and ``1/m`` for ``m`` samples, so
    ``sum_j weights_j (log_probs_j - log q_{indices_j})`` is the KL (top-k) or its estimate (sampled).
    """

    indices: Tensor  # (..., k) int64
    log_probs: Tensor  # (..., k)
    weights: Tensor  # (..., k)
    num_classes: int

    def __post_init__(self) -> None:
        if self.indices.shape[-1] == 0:
            raise ValueError("empty teacher targets: k must be >= 1")
        if not (self.indices.shape == self.log_probs.shape == self.weights.shape):
            raise ValueError("indices, log_probs and weights must have the same shape")
        if (self.indices < 0).any() or (self.indices >= self.num_classes).any():
            raise ValueError(f"target indices out of range [0, {self.num_classes})")

    def to(self, device: torch.device | str) -> "SparseTargets":
        return SparseTargets(self.indices.to(device), self.log_probs.to(device), self.weights.to(device), self.num_classes)

    def __getitem__(self, idx) -> "SparseTargets":
        return SparseTargets(self.indices[idx], self.log_probs[idx], self.weights[idx], self.num_classes)


def topk_targets(teacher_logits: Tensor, k: int, T: float = 1.0, operator: Operator = "power") -> SparseTargets:
    """Keep the teacher's ``k`` most probable classes, renormalise over them, then soften."""
    check_logits(teacher_logits, name="teacher logits")
    C = teacher_logits.shape[-1]
    if not 1 <= k <= C:
        raise ValueError(f"top-k needs 1 <= k <= num_classes ({C}), got k={k}")
    top, idx = torch.log_softmax(teacher_logits.detach().float(), -1).topk(k, dim=-1)
    return truncated_targets(idx, top, C, T, operator)


def truncated_targets(indices: Tensor, log_probs: Tensor, num_classes: int, T: float = 1.0, operator: Operator = "power") -> SparseTargets:
    """Targets from a truncated teacher (e.g. a cache or an API's top-k): renormalise, then soften.

    Softening acts on the kept classes only, since the rest are unknown; for the power operator
    this equals softening first and truncating after.
    """
    if indices.shape[-1] == 0:
        raise ValueError("empty teacher targets: k must be >= 1")
    log_p = log_probs.float() - torch.logsumexp(log_probs.float(), -1, keepdim=True)
    log_q = get_operator(operator).log_soften(log_p, T)
    return SparseTargets(indices.long(), log_q, log_q.exp(), num_classes)


def sampled_targets(
    teacher_logits: Tensor,
    num_samples: int,
    T: float = 1.0,
    operator: Operator = "power",
    generator: torch.Generator | None = None,
) -> SparseTargets:
    """Draw ``num_samples`` classes per position from the softened teacher (with replacement)."""
    check_logits(teacher_logits, name="teacher logits")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    C = teacher_logits.shape[-1]
    log_p = soften_log_probs(teacher_logits.detach(), T, operator)
    flat = log_p.reshape(-1, C).exp()
    idx = torch.multinomial(flat, num_samples, replacement=True, generator=generator).reshape(*log_p.shape[:-1], num_samples)
    lp = log_p.gather(-1, idx)
    return SparseTargets(idx, lp, torch.full_like(lp, 1.0 / num_samples), C)


def hard_targets(teacher_logits: Tensor) -> Tensor:
    """The teacher's argmax labels: all a text-only teacher exposes."""
    check_logits(teacher_logits, name="teacher logits")
    return teacher_logits.argmax(-1)


def sparse_kl(
    student_logits: Tensor, targets: SparseTargets, T: float = 1.0, operator: Operator = "power", scale_t2: bool | None = None
) -> Tensor:
    """``T^2 sum_j w_j (log p_j - log q_j)`` over the stored entries, averaged over positions (``T^2`` as in ``t2_factor``).

    For top-k targets this is ``KL(p_topk || q)`` restricted to the kept classes; for sampled
    targets it is the unbiased Monte-Carlo estimate of the full ``KL(p || q)``.
    """
    check_logits(student_logits)
    check_temperature(T)
    if student_logits.shape[-1] != targets.num_classes:
        raise ValueError(f"student has {student_logits.shape[-1]} classes, targets were built for {targets.num_classes}")
    if student_logits.shape[:-1] != targets.indices.shape[:-1]:
        raise ValueError(f"student positions {tuple(student_logits.shape[:-1])} != target positions {tuple(targets.indices.shape[:-1])}")
    log_q = soften_log_probs(student_logits, T, operator).gather(-1, targets.indices)
    per_pos = (targets.weights * (targets.log_probs - log_q)).sum(-1)
    return per_pos.mean() * t2_factor(T, operator, scale_t2)


def hard_label_loss(student_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy on teacher labels; works for ``(N, C)`` and sequence ``(B, L, V)`` logits."""
    check_logits(student_logits)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape[:-1])}")
    live = labels[labels != ignore_index]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= student_logits.shape[-1]):
        raise ValueError(f"teacher labels must be in [0, {student_logits.shape[-1]}) or {ignore_index} (ignored)")
    return F.cross_entropy(student_logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index)


def distill_loss(
    student_logits: Tensor,
    mode: TeacherMode,
    *,
    teacher_logits: Tensor | None = None,
    targets: SparseTargets | Tensor | None = None,
    T: float = 1.0,
    operator: Operator = "power",
) -> Tensor:
    """One entry point over the four teacher access modes.

    ``full`` takes ``teacher_logits``; ``topk`` and ``sampled`` take ``SparseTargets`` (the point
    of these modes is that full logits are not available at training time); ``hard`` takes labels.
    """
    if mode == "full":
        if teacher_logits is None:
            raise ValueError("mode 'full' needs teacher_logits")
        return forward_kl(student_logits, teacher_logits, T, operator)
    if mode in ("topk", "sampled"):
        if not isinstance(targets, SparseTargets):
            raise ValueError(f"mode {mode!r} needs SparseTargets (see topk_targets / sampled_targets)")
        return sparse_kl(student_logits, targets, T, operator)
    if mode == "hard":
        if not isinstance(targets, Tensor):
            raise ValueError("mode 'hard' needs a tensor of teacher labels (see hard_targets)")
        return hard_label_loss(student_logits, targets)
    raise ValueError(f"unknown teacher mode {mode!r}; choose one of {TEACHER_MODES}")
