import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from sparsedistill.distill import OPERATORS, PowerOperator, check_axioms, forward_kl, get_operator, temperature_for_entropy
from sparsedistill.distill.softening import SofteningOperator, entropy

logit_vectors = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=12)
temperatures = st.floats(0.05, 20.0)


def _probs_with_margin(z: list[float]) -> torch.Tensor:
    """Strictly positive probabilities with a unique maximum (boundary limits are then well defined)."""
    t = torch.tensor(z, dtype=torch.float64)
    top2 = t.topk(2).values
    assume(float(top2[0] - top2[1]) > 0.05)
    return torch.softmax(t, -1).unsqueeze(0)


@given(logit_vectors, temperatures)
def test_power_operator_equals_tempered_softmax(z, T):
    z = torch.tensor(z, dtype=torch.float64)
    q = PowerOperator()(torch.softmax(z, -1), T)
    assert torch.allclose(q, torch.softmax(z / T, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(OPERATORS))
@given(z=logit_vectors)
def test_every_operator_satisfies_the_axioms(name, z):
    report = check_axioms(OPERATORS[name], _probs_with_margin(z))
    assert report.ok, str(report)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_axioms_on_a_batch_of_confident_and_flat_rows(name):
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.1, 1.0, 5.0, 20.0], dtype=torch.float64).repeat_interleave(16).unsqueeze(1)
    p = torch.softmax(torch.randn(64, 10, generator=g, dtype=torch.float64) * scale, -1)
    assert check_axioms(OPERATORS[name], p).ok


class _Inverting(SofteningOperator):
    name = "inverting"

    def log_soften(self, log_p, T):
        return torch.log_softmax(-log_p / T, -1)


class _Shifted(SofteningOperator):
    name = "shifted"

    def log_soften(self, log_p, T):
        return torch.log_softmax(log_p / (T + 0.5), -1)


class _Sharpening(SofteningOperator):
    name = "sharpening"

    def log_soften(self, log_p, T):
        return torch.log_softmax(log_p * T, -1)


@pytest.mark.parametrize("op,broken", [(_Inverting(), "ranking"), (_Shifted(), "identity"), (_Sharpening(), "entropy_monotone")])
def test_axiom_checker_catches_violations(op, broken):
    p = torch.softmax(torch.randn(32, 6, dtype=torch.float64) * 2, -1)
    report = check_axioms(op, p)
    assert not report.passed[broken]
    assert not report.ok


def test_families_differ_at_equal_entropy():
    p = torch.tensor([[0.6, 0.25, 0.1, 0.05]], dtype=torch.float64)
    target = float(entropy(OPERATORS["power"](p, 3.0)).mean())
    outs = {}
    for name, op in OPERATORS.items():
        T = temperature_for_entropy(op, p, target)
        q = op(p, T)
        assert abs(float(entropy(q).mean()) - target) < 1e-8
        outs[name] = q
    names = sorted(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_odds_operator_equals_power_for_two_classes():
    p = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    for T in (0.3, 1.7, 5.0):
        assert torch.allclose(OPERATORS["odds"](p, T), OPERATORS["power"](p, T), atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_gradients_stay_finite_for_confident_students(name):
    z = torch.tensor([[60.0, 0.0, -3.0, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[20.0, 0.0, -5.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    forward_kl(z, t, 2.5, name).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("T", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_bad_temperature_is_rejected(name, T):
    with pytest.raises(ValueError, match="temperature"):
        OPERATORS[name](torch.tensor([[0.5, 0.5]]), T)


def test_unknown_operator_and_unreachable_entropy():
    with pytest.raises(ValueError, match="unknown softening operator"):
        get_operator("cubic")
    with pytest.raises(ValueError, match="outside"):
        temperature_for_entropy(OPERATORS["power"], torch.tensor([[0.9, 0.1]]), target=5.0)
