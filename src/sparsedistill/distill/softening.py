"""Probability-domain softening operators and a numerical axiom checker.

A softening operator maps a probability vector ``p`` and a temperature ``T > 0`` to another
probability vector. Following the Sparse-KD framework (paper 6), an operator is admissible
when it satisfies five axioms:

1. ranking preservation: ``p_i > p_j`` implies ``q_i >= q_j`` (strict for ``T`` finite);
2. continuity in ``p`` and in ``T``;
3. entropy monotonicity: ``H(S(p, T))`` is non-decreasing in ``T``;
4. identity at the neutral parameter: ``S(p, 1) = p``;
5. boundary behaviour: ``T -> 0`` gives the one-hot (uniform over the argmax set) and
   ``T -> inf`` gives the uniform distribution.

Three non-equivalent families are provided. They work in log space (``log_soften``) so that
losses stay finite when teachers are confident.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "SofteningOperator",
    "PowerOperator",
    "MixtureOperator",
    "OddsPowerOperator",
    "OPERATORS",
    "get_operator",
    "entropy",
    "temperature_for_entropy",
    "AxiomReport",
    "check_axioms",
]


def check_temperature(T: float | Tensor) -> None:
    """Raise a clear error for a temperature that is not a finite positive number."""
    t = torch.as_tensor(T)
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"temperature must be finite and > 0, got {T!r}")


def check_log_probs(log_p: Tensor) -> None:
    if log_p.ndim == 0 or log_p.shape[-1] < 1:
        raise ValueError(f"expected (..., num_classes) probabilities, got shape {tuple(log_p.shape)}")
    if torch.isnan(log_p).any() or torch.isposinf(log_p).any():
        raise ValueError("probabilities contain NaN or values above 1; check the teacher outputs")


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, with 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)


class SofteningOperator(ABC):
    """``S(p, T)``; subclasses implement ``log_soften`` on log-probabilities."""

    name: str = "operator"

    @abstractmethod
    def log_soften(self, log_p: Tensor, T: float | Tensor) -> Tensor:
        """Return ``log S(p, T)`` along the last dimension."""

    def __call__(self, p: Tensor, T: float | Tensor) -> Tensor:
        return self.log_soften(p.log(), T).exp()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PowerOperator(SofteningOperator):
    """``S(p, T) = p^(1/T) / Z``, identical to ``softmax(z / T)`` when ``p = softmax(z)``.

    Why the axioms hold: ``x -> x^(1/T)`` is strictly increasing (ranking) and continuous in
    ``p`` and ``T``; ``q = softmax(beta log p)`` with ``beta = 1/T`` is an exponential family
    whose entropy derivative is ``dH/dbeta = -beta Var_q(log p) <= 0`` (monotonicity);
    ``T = 1`` returns ``p``; ``beta -> inf`` keeps only the maximal entries and ``beta -> 0``
    makes every nonzero entry equal (boundary, uniform over the support of ``p``).
    """

    name = "power"

    def log_soften(self, log_p: Tensor, T: float | Tensor) -> Tensor:
        check_temperature(T)
        return torch.log_softmax(log_p / T, dim=-1)


class MixtureOperator(SofteningOperator):
    """Linear interpolation: towards uniform for ``T > 1``, towards the argmax for ``T < 1``.

    ``T >= 1``: ``q = (1 - a) p + a u`` with ``a = 1 - 1/T`` and ``u`` uniform.
    ``T < 1``:  ``q = (1 - b) p + b e`` with ``b = 1 - T`` and ``e`` uniform over argmax(p).

    Why the axioms hold: both maps are affine in ``p`` with a positive slope and add a vector
    that is constant (``u``) or largest exactly where ``p`` is largest (``e``), so order is kept;
    ``a`` and ``b`` are continuous in ``T`` and vanish at ``T = 1`` (identity); ``T -> inf``
    gives ``u`` and ``T -> 0`` gives ``e`` (boundary). Entropy is concave along a segment, so on
    the segment to ``u`` (its maximiser) it rises monotonically; along the segment to ``e`` its
    derivative is proportional to ``-log q_max - H(q) <= 0`` (Shannon entropy is at least the
    min-entropy), so it falls monotonically as ``T -> 0``.

    Not equivalent to the power family: for three or more classes the two trace different
    curves, and at equal entropy they give different distributions (the mixture keeps
    relative gaps, the power operator keeps ratios).
    """

    name = "mixture"

    def log_soften(self, log_p: Tensor, T: float | Tensor) -> Tensor:
        check_temperature(T)
        T = torch.as_tensor(T, dtype=log_p.dtype, device=log_p.device)
        p = log_p.exp()
        k = p.shape[-1]
        is_max = log_p == log_p.amax(dim=-1, keepdim=True)
        e = is_max.to(p.dtype) / is_max.sum(dim=-1, keepdim=True)
        a = (1 - 1 / T).clamp(min=0)
        b = (1 - T).clamp(min=0)
        q = (1 - a) * ((1 - b) * p + b * e) + a / k
        return q.log()


class OddsPowerOperator(SofteningOperator):
    """Temperature on each class's log-odds: ``q_i ∝ sigmoid(logit(p_i) / T)``.

    Why the axioms hold: ``p -> sigmoid(logit(p) / T)`` is strictly increasing and continuous
    (ranking, continuity); ``T = 1`` gives ``sigmoid(logit p) = p`` (identity); ``T -> inf``
    sends every entry to ``1/2`` (uniform) and ``T -> 0`` sends ``sigmoid(x / T)`` to the
    indicator of the largest log-odds, with ratios ``exp((x_i - x_j) / T)`` when all are
    negative (one-hot at the argmax). Entropy: with ``g_i = log sigmoid(beta x_i)``,
    ``beta = 1/T``, ``dH/dbeta = -Cov_q(g, dg/dbeta)`` and ``dg/dbeta = x sigmoid(-beta x)``.
    ``g`` increases with ``x``; ``dg/dbeta`` increases for ``beta x < 1.27`` and is positive
    for ``x > 0``, negative for ``x < 0``. At most one class has ``p > 1/2`` (``x > 0``), so every
    pair of classes is ordered the same way by ``g`` and by ``dg/dbeta``; the covariance is a
    sum of non-negative pair terms and the entropy rises with ``T``.

    Not equivalent to the power family for three or more classes (for two classes it is the
    same map, since both raise the odds ratio to ``1/T``).
    """

    name = "odds"

    def log_soften(self, log_p: Tensor, T: float | Tensor) -> Tensor:
        check_temperature(T)
        logit = log_p - _log_one_minus(log_p)
        return torch.log_softmax(torch.nn.functional.logsigmoid(logit / T), dim=-1)


def _log_one_minus(log_p: Tensor) -> Tensor:
    """``log(1 - p)`` from log-probabilities, finite (with finite gradients) even when ``p`` rounds to 1.

    Only the largest entry can be close to 1; its ``1 - p`` is the mass of the other classes,
    a log-sum-exp without cancellation. Every other entry has ``p <= 1/2`` and uses ``log1p``.
    """
    top = log_p.argmax(dim=-1, keepdim=True)
    others = torch.logsumexp(log_p.scatter(-1, top, float("-inf")), dim=-1, keepdim=True)
    safe = log_p.scatter(-1, top, float("-inf"))  # keeps log1p away from the top entry's gradient
    return torch.log1p(-safe.exp()).scatter(-1, top, others)


OPERATORS: dict[str, SofteningOperator] = {
    op.name: op for op in (PowerOperator(), MixtureOperator(), OddsPowerOperator())
}


def get_operator(name: str | SofteningOperator) -> SofteningOperator:
    if isinstance(name, SofteningOperator):
        return name
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"unknown softening operator {name!r}; choose one of {sorted(OPERATORS)}") from None


def temperature_for_entropy(
    op: SofteningOperator,
    p: Tensor,
    target: float,
    lo: float = 1e-3,
    hi: float = 1e3,
    iters: int = 60,
) -> float:
    """Temperature at which the mean entropy of ``op(p, T)`` over the batch equals ``target``.

    Bisection on ``log T``; it relies on the entropy-monotonicity axiom.
    """
    p = p.double()
    h = lambda T: float(entropy(op(p, T)).mean())  # noqa: E731
    h_lo, h_hi = h(lo), h(hi)
    if not h_lo <= target <= h_hi:
        raise ValueError(
            f"target entropy {target:.4f} nats is outside [{h_lo:.4f}, {h_hi:.4f}] reachable "
            f"by {op.name} for T in [{lo}, {hi}]"
        )
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if h(math.exp(mid)) < target:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


@dataclass
class AxiomReport:
    """Worst violation found for each axiom (0 means none) and whether it is within ``tol``."""

    operator: str
    violations: dict[str, float] = field(default_factory=dict)
    tol: float = 1e-6

    @property
    def passed(self) -> dict[str, bool]:
        return {k: v <= self.tol for k, v in self.violations.items()}

    @property
    def ok(self) -> bool:
        return all(self.passed.values())

    def __str__(self) -> str:
        rows = ", ".join(f"{k}={'ok' if self.passed[k] else f'FAIL({v:.2e})'}" for k, v in self.violations.items())
        return f"{self.operator}: {rows}"


def check_axioms(
    op: SofteningOperator,
    p: Tensor,
    temperatures: Tensor | None = None,
    tol: float = 1e-6,
) -> AxiomReport:
    """Test the five axioms numerically on a batch of probability vectors ``p`` (float64).

    Returns the worst violation per axiom; use ``report.ok`` or ``report.passed``.
    ``p`` should have strictly positive entries and a unique maximum per row for the boundary
    test to be meaningful.
    """
    p = p.double()
    if p.ndim != 2:
        raise ValueError(f"check_axioms expects a (batch, classes) tensor, got shape {tuple(p.shape)}")
    if temperatures is None:
        temperatures = torch.logspace(-1.5, 1.5, 41, dtype=torch.float64)
    temps = sorted(float(t) for t in temperatures)
    qs = torch.stack([op(p, T) for T in temps])  # (nT, B, C)
    v: dict[str, float] = {}

    # 1. ranking: p_i > p_j must never give q_i < q_j.
    gt = p.unsqueeze(-1) > p.unsqueeze(-2)
    inversions = (qs.unsqueeze(-1) - qs.unsqueeze(-2)).neg().clamp(min=0) * gt
    v["ranking"] = float(inversions.amax())

    # 2. continuity: a small step in T or in p moves q by a small amount.
    eps = 1e-6
    jump_t = max(float((op(p, T * (1 + eps)) - op(p, T)).abs().amax()) for T in temps)
    p_eps = p + eps * torch.rand_like(p) * p
    p_eps = p_eps / p_eps.sum(-1, keepdim=True)
    jump_p = max(float((op(p_eps, T) - op(p, T)).abs().amax()) for T in temps)
    v["continuity"] = max(0.0, max(jump_t, jump_p) - 1e-3)

    # 3. entropy is non-decreasing in T.
    h = entropy(qs)  # (nT, B)
    v["entropy_monotone"] = float((h[:-1] - h[1:]).clamp(min=0).amax())

    # 4. identity at T = 1.
    v["identity"] = float((op(p, 1.0) - p).abs().amax())

    # 5. boundaries: one-hot at argmax as T -> 0, uniform as T -> inf.
    onehot = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double()
    uniform = torch.full_like(p, 1.0 / p.shape[-1])
    low = float((op(p, 1e-4) - onehot).abs().amax())
    high = float((op(p, 1e6) - uniform).abs().amax())
    v["boundary"] = max(0.0, max(low, high) - 1e-3)
    return AxiomReport(op.name, v, tol)
