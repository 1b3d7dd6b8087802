import pytest
import torch
from torch import nn

from sparsedistill.weights import is_nm_sparse, nm_mask
from sparsedistill.weights.permutation import kept_magnitude, permute_linear_pair, search_permutation


def _structured_weight():
    # Large weights bunched into the same groups (columns 0-31): the identity order loses half of
    # them under 2:4, a good order pairs two large with two small channels in every group.
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.1
    w[:, :32] *= 20
    return w


def test_search_keeps_more_magnitude_and_reports_it():
    w = _structured_weight()
    res = search_permutation(w, rounds=800)
    assert sorted(res.perm.tolist()) == list(range(64))
    assert res.kept_after > res.kept_before + 0.2 and res.swaps > 0
    total = float(w.abs().sum())
    assert res.kept_after == pytest.approx(float(kept_magnitude(w[:, res.perm])) / total, rel=1e-5)
    assert res.kept_before == pytest.approx(float(kept_magnitude(w)) / total, rel=1e-5)


def test_search_never_makes_things_worse_on_random_weights():
    w = torch.randn(32, 128)
    res = search_permutation(w, rounds=200)
    assert res.kept_after >= res.kept_before


def test_permuting_an_mlp_pair_preserves_its_function():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 8)
    fc2.weight.data = _structured_weight()[:8, :32]
    x = torch.randn(5, 16)
    before = fc2(torch.nn.functional.gelu(fc1(x)))
    res = search_permutation(fc2.weight, rounds=300)
    permute_linear_pair(fc1, fc2, res.perm)
    assert torch.allclose(fc2(torch.nn.functional.gelu(fc1(x))), before, atol=1e-5)
    pruned = fc2.weight * nm_mask(fc2.weight)
    assert is_nm_sparse(pruned)
    with pytest.raises(ValueError, match="must all agree"):
        permute_linear_pair(fc1, nn.Linear(16, 8), res.perm)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_linear_pair(fc1, fc2, torch.zeros(32, dtype=torch.long))
