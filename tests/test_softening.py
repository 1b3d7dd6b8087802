import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsedistill.distill import OPERATORS, PowerOperator, check_axioms, forward_kl, get_operator, reverse_kl, temperature_for_entropy
from sparsedistill.distill.softening import SofteningOperator, entropy

logit_vectors = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=12)
# Half-integer logits: exact ties are common, and distinct values differ by at least 0.5.
tied_logit_vectors = st.lists(st.integers(-16, 16), min_size=2, max_size=12).map(lambda v: [x / 2 for x in v])
temperatures = st.floats(0.05, 20.0)


def _probs(z: list[float]) -> torch.Tensor:
    return torch.softmax(torch.tensor(z, dtype=torch.float64), -1).unsqueeze(0)


@given(logit_vectors, temperatures)
def test_power_operator_equals_tempered_softmax(z, T):
    z = torch.tensor(z, dtype=torch.float64)
    q = PowerOperator()(torch.softmax(z, -1), T)
    assert torch.allclose(q, torch.softmax(z / T, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(OPERATORS))
@given(z=tied_logit_vectors)
def test_every_operator_satisfies_the_axioms(name, z):
    report = check_axioms(OPERATORS[name], _probs(z))
    assert report.ok, str(report)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_axioms_on_a_batch_of_confident_and_flat_rows(name):
    g = torch.Generator().manual_seed(1)
    # Up to 12-nat logit gaps; exptilt's uniform limit is slow for far smaller probabilities (see its docstring).
    scale = torch.tensor([0.1, 1.0, 2.5, 5.0], dtype=torch.float64).repeat_interleave(16).unsqueeze(1)
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


class _ArgmaxMixture(SofteningOperator):
    """Mixes with the one-hot of argmax for T < 1: jumps when the top two classes swap."""

    name = "argmax-mixture"

    def log_soften(self, log_p, T):
        b = max(0.0, 1 - T)
        onehot = torch.nn.functional.one_hot(log_p.argmax(-1), log_p.shape[-1]).to(log_p.dtype)
        return ((1 - b) * log_p.exp() + b * onehot).log()


class _HalfWay(SofteningOperator):
    """Averages p with the tempered softmax: never reaches the one-hot or uniform limits."""

    name = "half-way"

    def log_soften(self, log_p, T):
        return (0.5 * log_p.exp() + 0.5 * torch.softmax(log_p / T, -1)).log()


@pytest.mark.parametrize(
    "op,broken",
    [(_Inverting(), "ranking"), (_Shifted(), "identity"), (_Sharpening(), "entropy_monotone"),
     (_ArgmaxMixture(), "continuity"), (_HalfWay(), "boundary")],
)
def test_axiom_checker_catches_violations(op, broken):
    p = torch.softmax(torch.randn(32, 6, dtype=torch.float64) * 2, -1)
    p = torch.cat([p, torch.tensor([[0.4, 0.4, 0.1, 0.05, 0.03, 0.02]], dtype=torch.float64)])  # a tie at the top
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


@pytest.mark.parametrize("T", [0.5, 2.5])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_losses_and_gradients_stay_finite_when_probabilities_underflow(name, T):
    # exp(-200) underflows float32: p is exactly 0 for the small classes and 1 for the top one.
    z = torch.tensor([[200.0, 0.0, -3.0, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[20.0, 0.0, -5.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    for loss in (forward_kl, reverse_kl):
        z.grad = None
        value = loss(z, t, T, name)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(z.grad).all(), loss.__name__


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


def test_operators_reject_logits_passed_as_probabilities():
    with pytest.raises(ValueError, match="not logits"):
        OPERATORS["power"](torch.tensor([[2.0, -1.0]]), 2.0)
