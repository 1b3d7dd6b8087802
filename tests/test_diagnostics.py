import numpy as np
import pytest
import torch

from sparsedistill.distill import brier_bias_variance, fit_inverse_n, log_loss_bias_variance


def _runs(n_runs=5, n=200, c=4):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, c, generator=g)
    logits = base + 0.5 * torch.randn(n_runs, n, c, generator=g)
    return torch.softmax(logits.double(), -1), torch.randint(0, c, (n,), generator=g)


def test_brier_decomposition_is_exact():
    probs, y = _runs()
    bv = brier_bias_variance(probs, y)
    onehot = torch.nn.functional.one_hot(y, 4).double()
    direct = ((probs - onehot) ** 2).sum(-1).mean()
    assert bv.total == pytest.approx(float(direct))
    assert bv.total == pytest.approx(bv.bias + bv.variance)
    assert bv.variance > 0


def test_log_loss_decomposition_is_exact():
    probs, y = _runs()
    bv = log_loss_bias_variance(probs, y)
    direct = -probs.log().gather(-1, y.view(1, -1, 1).expand(5, -1, 1)).mean()
    assert bv.total == pytest.approx(float(direct))
    assert bv.total == pytest.approx(bv.bias + bv.variance)


def test_identical_runs_have_no_variance():
    probs, y = _runs(n_runs=1)
    same = probs.expand(3, -1, -1)
    assert brier_bias_variance(same, y).variance == pytest.approx(0, abs=1e-12)
    assert log_loss_bias_variance(same, y).variance == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 runs"):
        brier_bias_variance(probs, y)


def test_inverse_n_fit_recovers_parameters():
    ns = np.array([1, 2, 4, 8])
    fit = fit_inverse_n(ns, 0.01 + 0.2 / ns)
    assert fit.a == pytest.approx(0.01) and fit.b == pytest.approx(0.2) and fit.r2 == pytest.approx(1.0)
    pure = fit_inverse_n(ns, 0.3 / ns)
    assert pure.gamma == pytest.approx(1.0) and pure.c == pytest.approx(0.3)
    flat = fit_inverse_n(ns, np.array([0.1, 0.1, 0.1, 0.1]))
    assert flat.b == pytest.approx(0, abs=1e-12) and flat.gamma == pytest.approx(0, abs=1e-9)
    assert np.isnan(fit_inverse_n(ns, np.array([0.1, -0.01, 0.0, 0.02])).gamma)
    with pytest.raises(ValueError):
        fit_inverse_n([1], [0.1])
