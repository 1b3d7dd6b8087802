"""Diagnostics for distilled students: bias-variance over seeds and the error-vs-stages fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["BiasVariance", "brier_bias_variance", "log_loss_bias_variance", "InverseNFit", "fit_inverse_n"]


@dataclass
class BiasVariance:
    """``total = bias + variance`` (noise is zero: labels are taken as the truth)."""

    total: float
    bias: float
    variance: float

    def as_dict(self) -> dict[str, float]:
        return {"total": self.total, "bias": self.bias, "variance": self.variance}


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.ndim != 3:
        raise ValueError(f"probs must be (runs, samples, classes), got {tuple(probs.shape)}")
    if labels.shape != probs.shape[1:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match {probs.shape[1]} samples")
    if probs.shape[0] < 2:
        raise ValueError("a variance needs predictions from at least 2 runs (seeds or resamples)")


def brier_bias_variance(probs: Tensor, labels: Tensor) -> BiasVariance:
    """Squared-error decomposition of ``E_runs ||q - y||^2`` over ``(runs, samples, classes)``.

    ``bias = ||mean_q - y||^2`` and ``variance = E ||q - mean_q||^2``, averaged over samples.
    """
    _check(probs, labels)
    p = probs.double()
    y = torch.nn.functional.one_hot(labels.long(), p.shape[-1]).double()
    mean = p.mean(0)
    total = ((p - y) ** 2).sum(-1).mean()
    bias = ((mean - y) ** 2).sum(-1).mean()
    var = ((p - mean) ** 2).sum(-1).mean()
    return BiasVariance(float(total), float(bias), float(var))


def log_loss_bias_variance(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> BiasVariance:
    """Heskes' decomposition of the expected log loss ``E_runs[-log q_y]``.

    The central prediction is the normalised geometric mean ``qbar``; ``bias = -log qbar_y`` and
    ``variance = E_runs KL(qbar || q)``; the two add up to the expected log loss exactly.
    """
    _check(probs, labels)
    logp = probs.double().clamp_min(eps).log()
    log_geo = logp.mean(0)
    log_qbar = log_geo - torch.logsumexp(log_geo, -1, keepdim=True)
    y = labels.long().unsqueeze(-1)
    total = -logp.gather(-1, y.expand(logp.shape[0], -1, 1)).mean()
    bias = -log_qbar.gather(-1, y).mean()
    var = (log_qbar.exp() * (log_qbar - logp)).sum(-1).mean()
    return BiasVariance(float(total), float(bias), float(var))


@dataclass
class InverseNFit:
    """``gap(n) ~ a + b / n`` by least squares, plus a free power law ``c n^-gamma`` for comparison."""

    a: float
    b: float
    r2: float
    gamma: float
    c: float

    def predict(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.a + self.b / np.asarray(n, dtype=float)


def fit_inverse_n(ns: list[int] | np.ndarray, gaps: list[float] | np.ndarray) -> InverseNFit:
    """Fit the final error gap against the number of stages ``n``.

    ``b > 0`` with a good ``r2`` supports the ``O(1/n)`` prediction; ``gamma`` is the exponent of
    a power-law fit on positive gaps (``nan`` if any gap is not positive), 1 for a pure ``1/n``.
    """
    n = np.asarray(ns, dtype=float)
    g = np.asarray(gaps, dtype=float)
    if n.shape != g.shape or n.size < 2:
        raise ValueError("need matching ns and gaps with at least 2 points")
    if (n <= 0).any():
        raise ValueError("numbers of stages must be positive")
    X = np.stack([np.ones_like(n), 1 / n], 1)
    (a, b), *_ = np.linalg.lstsq(X, g, rcond=None)
    resid = g - X @ np.array([a, b])
    ss_tot = float(((g - g.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    if (g > 0).all():
        slope, intercept = np.polyfit(np.log(n), np.log(g), 1)
        gamma, c = -float(slope), math.exp(float(intercept))
    else:
        gamma, c = float("nan"), float("nan")
    return InverseNFit(float(a), float(b), r2, gamma, c)
