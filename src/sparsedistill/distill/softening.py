"""Probability-domain softening operators and a numerical axiom checker.

A softening operator maps a probability vector ``p`` and a temperature ``T > 0`` to another
probability vector. Following the Sparse-KD framework (paper 6), an operator is admissible
when it satisfies five axioms:

1. ranking preservation: ``p_i > p_j`` implies ``q_i >= q_j`` (strict for ``T`` finite);
2. continuity in ``p`` and in ``T``;
3. entropy monotonicity: ``H(S(p, T))`` is non-decreasing in ``T``;
4. identity at the neutral parameter: ``S(p, 1) = p``;
5. boundary behaviour: ``T -> 0`` gives the one-hot (uniform over the argmax set when there are
   ties) and ``T -> inf`` gives the uniform distribution (over the classes with nonzero mass).

Three non-equivalent families are provided: power (Hinton's temperature), exp-tilt (a softmax
in the probability domain) and odds-power (temperature on each class's log-odds). They work in
log space (``log_soften``) so that losses stay finite when a student's probabilities underflow.
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
    "ExpTiltOperator",
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


def check_probs(p: Tensor) -> None:
    if p.ndim == 0 or p.shape[-1] < 1:
        raise ValueError(f"expected (..., num_classes) probabilities, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative; pass softmax outputs, not logits")


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
        check_probs(p)
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


class ExpTiltOperator(SofteningOperator):
    """Softmax in the probability domain: ``q_i ∝ expm1(beta p_i) / beta`` with ``beta = 1/T - T``.

    ``beta = 0`` (``T = 1``) is the limit ``q = p``; large ``beta`` gives ``softmax(beta p)``, which
    sharpens by probability *differences* rather than ratios; negative ``beta`` gives
    ``q_i ∝ 1 - exp(-|beta| p_i)``, which flattens every class that has mass. Computed as
    ``log q = log p + phi(beta p) - log Z`` with ``phi(x) = log(expm1(x) / x)``, finite even when
    ``p`` underflows.

    Why the axioms hold: ``x -> expm1(beta x) / beta`` is strictly increasing for every ``beta``
    (ranking) and continuous in ``p`` and ``T`` (including ``beta = 0``, continuity); ``T = 1``
    gives ``p`` (identity); ``beta -> +inf`` (``T -> 0``) concentrates on the argmax set and
    ``beta -> -inf`` (``T -> inf``) sends every positive entry to the same value (boundary,
    uniform over the support of ``p``; entries below about ``1/|beta|`` stay proportional to ``p``
    until ``T`` is large enough, so the uniform limit is slow for near-zero probabilities). Entropy: with ``f_i = expm1(beta p_i) / beta``,
    ``dH/dbeta = -Cov_q(log f, d log f / dbeta)``; ``d log f / dbeta = (x e^x / (e^x - 1) - 1) / beta``
    with ``x = beta p_i`` is increasing in ``p_i`` for either sign of ``beta`` (``x e^x / (e^x - 1)``
    is increasing in ``x``), and so is ``log f``; comonotone functions have non-negative covariance,
    so entropy falls as ``beta`` rises, i.e. rises with ``T``.

    Not equivalent to the power family: at equal entropy it keeps a different shape (it compresses
    large probability gaps and leaves small probabilities almost proportional to ``p``).

    As a distillation target at high entropy it saturates: every class above about ``1/|beta|``
    gets nearly the same weight on both sides, so the student loses the teacher's ranking among
    them (on Fashion-MNIST at the power operator's T = 4 entropy it needs T ≈ 9,000 and students
    fall to 75 ± 7% accuracy; see docs/results/kd-experiment).
    """

    name = "exptilt"

    def log_soften(self, log_p: Tensor, T: float | Tensor) -> Tensor:
        check_temperature(T)
        T = torch.as_tensor(T, dtype=log_p.dtype, device=log_p.device)
        beta = 1 / T - T
        return torch.log_softmax(log_p + _log_expm1_ratio(beta * log_p.exp()), dim=-1)


def _log_expm1_ratio(x: Tensor) -> Tensor:
    """``log(expm1(x) / x)``, smooth through ``x = 0`` and stable for large ``|x|``."""
    small = x.abs() < 1e-3
    big = x > 30
    xs = torch.where(small | big, torch.ones_like(x), x)  # keeps unused branches finite (and their gradients)
    mid = torch.log(torch.expm1(xs) / xs)
    xb = torch.where(big, x, torch.full_like(x, 31.0))
    large = xb - torch.log(xb) + torch.log1p(-torch.exp(-xb))
    series = x / 2 + x * x / 24
    return torch.where(small, series, torch.where(big, large, mid))


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
    op.name: op for op in (PowerOperator(), ExpTiltOperator(), OddsPowerOperator())
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
    hi: float = 1e8,
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

    Returns the worst violation per axiom; use ``report.ok`` or ``report.passed``. Rows of ``p``
    should be strictly positive (the uniform limit is over the support); the limits are probed at
    ``T = 1e-12`` and ``T = 1e12``.
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
    # Tilt p slightly towards its first and towards its last classes, so ties break both ways.
    w = torch.linspace(0, 1, p.shape[-1], dtype=p.dtype)
    jump_p = 0.0
    for tilt in (w, w.flip(0)):
        p_eps = p * (1 + eps * tilt)
        p_eps = p_eps / p_eps.sum(-1, keepdim=True)
        jump_p = max(jump_p, max(float((op(p_eps, T) - op(p, T)).abs().amax()) for T in temps))
    v["continuity"] = max(0.0, max(jump_t, jump_p) - 1e-3)

    # 3. entropy is non-decreasing in T.
    h = entropy(qs)  # (nT, B)
    v["entropy_monotone"] = float((h[:-1] - h[1:]).clamp(min=0).amax())

    # 4. identity at T = 1.
    v["identity"] = float((op(p, 1.0) - p).abs().amax())

    # 5. boundaries: uniform over the argmax set as T -> 0, uniform as T -> inf.
    is_max = p == p.amax(-1, keepdim=True)
    top = is_max.double() / is_max.sum(-1, keepdim=True)
    uniform = torch.full_like(p, 1.0 / p.shape[-1])
    low = float((op(p, 1e-12) - top).abs().amax())
    high = float((op(p, 1e12) - uniform).abs().amax())
    v["boundary"] = max(0.0, max(low, high) - 1e-3)
    return AxiomReport(op.name, v, tol)
