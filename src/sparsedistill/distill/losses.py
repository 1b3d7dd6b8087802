"""Distillation losses.

Logit losses take student and teacher logits of shape ``(..., num_classes)`` and average over
every leading position (samples, tokens). Softening goes through a probability-domain operator
(``softening.py``); the default power operator is Hinton's temperature.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .softening import SofteningOperator, check_temperature, get_operator

__all__ = [
    "check_logits",
    "soften_log_probs",
    "forward_kl",
    "reverse_kl",
    "js_divergence",
    "logit_mse",
    "HintLoss",
    "attention_kl",
    "normalize_scores",
    "ensemble_scores",
]

Operator = str | SofteningOperator


def _values_readable(t: Tensor) -> bool:
    """False while a CUDA graph captures, or while host syncs are errors (how the graphed step checks a
    step before capture): the value checks, which read the device, are skipped then."""
    return not t.is_cuda or (not torch.cuda.is_current_stream_capturing() and torch.cuda.get_sync_debug_mode() != 2)


def check_logits(student: Tensor, teacher: Tensor | None = None, name: str = "logits") -> None:
    """Raise a clear error for mismatched shapes, missing class dimension or NaN/inf values."""
    if student.ndim < 1:
        raise ValueError(f"{name} need a class dimension, got a scalar")
    if student.numel() == 0:
        raise ValueError(f"empty {name} of shape {tuple(student.shape)}: nothing to distill")
    if teacher is not None and student.shape != teacher.shape:
        if student.shape[:-1] == teacher.shape[:-1]:
            raise ValueError(
                f"student has {student.shape[-1]} classes but teacher has {teacher.shape[-1]}; "
                "distillation needs the same label space"
            )
        raise ValueError(f"student {name} {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    for who, t in (("student", student), ("teacher", teacher)):
        if t is None or not _values_readable(t):
            continue
        if not torch.isfinite(t).all():
            raise ValueError(f"{who} {name} contain NaN or inf; check the model outputs (fp16 overflow?)")


def soften_log_probs(logits: Tensor, T: float, operator: Operator = "power") -> Tensor:
    """``log S(softmax(logits), T)``; for the power operator this is ``log_softmax(logits / T)``."""
    return get_operator(operator).log_soften(torch.log_softmax(logits.float(), dim=-1), T)


def t2_factor(T: float, operator: Operator, scale_t2: bool | None) -> float:
    """Hinton's ``T^2``: it undoes the ``1/T^2`` shrinkage of power-softened gradients.

    ``None`` (the default) applies it for the power operator only; the other families shrink
    gradients differently (exp-tilt's T can be in the thousands at moderate entropy), so they
    get ``1`` unless asked.
    """
    if scale_t2 is None:
        scale_t2 = get_operator(operator).name == "power"
    return T * T if scale_t2 else 1.0


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over leading positions of KL(p || q), with 0 log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).mean()


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    T: float = 1.0,
    operator: Operator = "power",
    scale_t2: bool | None = None,
) -> Tensor:
    """Hinton's KD loss ``T^2 KL(S(p_t, T) || S(p_s, T))`` (``T^2`` as in ``t2_factor``)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(T)
    loss = _kl(soften_log_probs(teacher_logits.detach(), T, operator), soften_log_probs(student_logits, T, operator))
    return loss * t2_factor(T, operator, scale_t2)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0, operator: Operator = "power", scale_t2: bool | None = None
) -> Tensor:
    """Mode-seeking ``KL(S(p_s, T) || S(p_t, T))`` (``T^2`` as in ``t2_factor``)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(T)
    loss = _kl(soften_log_probs(student_logits, T, operator), soften_log_probs(teacher_logits.detach(), T, operator))
    return loss * t2_factor(T, operator, scale_t2)


def js_divergence(
    student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0, operator: Operator = "power", scale_t2: bool | None = None
) -> Tensor:
    """Jensen-Shannon divergence between the softened distributions (at most log 2 before ``t2_factor``)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(T)
    log_s = soften_log_probs(student_logits, T, operator)
    log_t = soften_log_probs(teacher_logits.detach(), T, operator)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - torch.log(torch.tensor(2.0))
    return 0.5 * (_kl(log_s, log_m) + _kl(log_t, log_m)) * t2_factor(T, operator, scale_t2)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, center: bool = True) -> Tensor:
    """Mean squared error between logits; ``center`` removes the per-row mean (softmax-invariant shift)."""
    check_logits(student_logits, teacher_logits)
    s, t = student_logits.float(), teacher_logits.detach().float()
    if center:
        s = s - s.mean(-1, keepdim=True)
        t = t - t.mean(-1, keepdim=True)
    return F.mse_loss(s, t)


class HintLoss(nn.Module):
    """FitNets hint loss: MSE between a learned projection of student features and teacher features.

    Features are ``(..., dim)``; the projection is trained with the student.
    """

    def __init__(self, student_dim: int, teacher_dim: int, normalize: bool = False) -> None:
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)
        self.student_dim, self.teacher_dim, self.normalize = student_dim, teacher_dim, normalize

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        if student_feats.shape[-1] != self.student_dim or teacher_feats.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"HintLoss built for student dim {self.student_dim} -> teacher dim {self.teacher_dim}, "
                f"got {tuple(student_feats.shape)} and {tuple(teacher_feats.shape)}"
            )
        if student_feats.shape[:-1] != teacher_feats.shape[:-1]:
            raise ValueError(
                f"student and teacher features differ in leading shape: "
                f"{tuple(student_feats.shape[:-1])} vs {tuple(teacher_feats.shape[:-1])}"
            )
        s, t = self.proj(student_feats.float()), teacher_feats.detach().float()
        if self.normalize:
            s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
        return F.mse_loss(s, t)


def attention_kl(student_attn: Tensor, teacher_attn: Tensor, eps: float = 1e-12) -> Tensor:
    """KL(teacher || student) between attention distributions over keys (last dim).

    Inputs are probabilities, e.g. ``(batch, heads, queries, keys)``; rows that are all zero
    (fully masked queries) are ignored. A teacher with ``g`` times more heads than the student is
    averaged in groups of ``g`` consecutive heads (dim 1).
    """
    if student_attn.ndim != teacher_attn.ndim or student_attn.ndim < 2:
        raise ValueError(f"attention maps must have the same rank >= 2: {tuple(student_attn.shape)} vs {tuple(teacher_attn.shape)}")
    if student_attn.ndim >= 3 and student_attn.shape[1] != teacher_attn.shape[1]:
        hs, ht = student_attn.shape[1], teacher_attn.shape[1]
        if ht % hs:
            raise ValueError(f"teacher heads ({ht}) must be a multiple of student heads ({hs})")
        teacher_attn = teacher_attn.unflatten(1, (hs, ht // hs)).mean(2)
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(student_attn.shape)} vs {tuple(teacher_attn.shape)}")
    t = teacher_attn.detach().float()
    s = student_attn.float()
    kl = (t * (torch.log(t + eps) - torch.log(s + eps))).sum(-1)
    live = (t.sum(-1) > 0).to(kl.dtype)  # rows a mask emptied carry no target
    # a masked mean without indexing or a host read: the same value, and a CUDA graph can hold it
    return (kl * live).sum() / live.sum().clamp_min(1)


def normalize_scores(scores: Tensor, method: Literal["minmax", "zscore"] = "minmax", dim: int = -1, eps: float = 1e-6) -> Tensor:
    """Normalise each query's (row's) scores so teachers on different scales can be summed."""
    if method == "minmax":
        lo, hi = scores.amin(dim, keepdim=True), scores.amax(dim, keepdim=True)
        return (scores - lo) / (hi - lo).clamp(min=eps)
    if method == "zscore":
        mu = scores.mean(dim, keepdim=True)
        sd = scores.std(dim, keepdim=True, unbiased=False)
        return (scores - mu) / sd.clamp(min=eps)
    raise ValueError(f"unknown normalisation {method!r}; use 'minmax' or 'zscore'")


def ensemble_scores(
    teacher_scores: Sequence[Tensor],
    method: Literal["minmax", "zscore"] = "minmax",
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Multi-teacher target: per-row normalised scores, weighted sum, times ``scale``.

    The result can be used as teacher logits over candidates (e.g. ``forward_kl`` on
    ``(queries, candidates)`` scores), as in dense + sparse ensemble distillation.
    """
    if not teacher_scores:
        raise ValueError("ensemble_scores needs at least one teacher")
    shape = teacher_scores[0].shape
    for i, s in enumerate(teacher_scores):
        if s.shape != shape:
            raise ValueError(f"teacher {i} scores have shape {tuple(s.shape)}, teacher 0 has {tuple(shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"teacher {i} scores contain NaN or inf")
    weights = [1.0] * len(teacher_scores) if weights is None else list(weights)
    if len(weights) != len(teacher_scores):
        raise ValueError(f"{len(weights)} weights for {len(teacher_scores)} teachers")
    total = sum(w * normalize_scores(s.float(), method) for w, s in zip(weights, teacher_scores))
    return total * scale
