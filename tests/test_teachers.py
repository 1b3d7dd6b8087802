import numpy as np
import pytest
import torch

from sparsedistill.distill import TeacherCache, distill_loss, forward_kl, hard_targets, sampled_targets, sparse_kl, topk_targets
from sparsedistill.distill.teachers import SparseTargets, hard_label_loss


def test_topk_with_all_classes_is_the_full_kl():
    s, t = torch.randn(8, 6), torch.randn(8, 6) * 2
    for T in (1.0, 3.0):
        assert torch.allclose(sparse_kl(s, topk_targets(t, 6, T), T), forward_kl(s, t, T), atol=1e-5)


def test_topk_targets_are_renormalised_and_ordered():
    t = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    tg = topk_targets(t, 2)
    assert tg.indices.tolist() == [[0, 2]]
    assert torch.allclose(tg.weights.sum(-1), torch.ones(1))
    assert torch.allclose(tg.weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_sampled_estimator_is_unbiased_for_kl_and_gradient():
    torch.manual_seed(0)
    t = torch.randn(4, 8) * 2
    s = torch.randn(4, 8, requires_grad=True)
    full = forward_kl(s, t, 2.0)
    (g_full,) = torch.autograd.grad(full, s)
    g = torch.Generator().manual_seed(0)
    est = sparse_kl(s, sampled_targets(t, 20000, 2.0, generator=g), 2.0)
    (g_est,) = torch.autograd.grad(est, s)
    assert abs(est.item() - full.item()) < 0.03 * full.item() + 1e-3
    assert torch.allclose(g_est, g_full, atol=3e-3)


def test_single_sample_estimates_average_to_the_kl():
    t, s = torch.randn(2, 5) * 2, torch.randn(2, 5)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sparse_kl(s, sampled_targets(t, 1, generator=g)) for _ in range(6000)])
    assert abs(float(draws.mean()) - float(forward_kl(s, t))) < 4 * float(draws.std()) / 6000**0.5


def test_hard_labels_and_sequence_level_kd():
    t = torch.randn(2, 5, 11)
    labels = hard_targets(t)
    assert labels.shape == (2, 5) and torch.equal(labels, t.argmax(-1))
    s = torch.randn(2, 5, 11)
    labels[0, -1] = -100  # padding is ignored
    ref = torch.nn.functional.cross_entropy(s.reshape(-1, 11)[labels.flatten() != -100], labels.flatten()[labels.flatten() != -100])
    assert torch.allclose(hard_label_loss(s, labels), ref)


def test_distill_loss_dispatch_and_errors():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(distill_loss(s, "full", teacher_logits=t, T=2.0), forward_kl(s, t, 2.0))
    assert torch.allclose(distill_loss(s, "topk", targets=topk_targets(t, 5)), forward_kl(s, t), atol=1e-5)
    assert torch.allclose(distill_loss(s, "hard", targets=t.argmax(-1)), hard_label_loss(s, t.argmax(-1)))
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distill_loss(s, "full")
    with pytest.raises(ValueError, match="SparseTargets"):
        distill_loss(s, "topk", targets=t)
    with pytest.raises(ValueError, match="unknown teacher mode"):
        distill_loss(s, "oracle", teacher_logits=t)


def test_bad_sparse_targets():
    with pytest.raises(ValueError, match="k must be >= 1"):
        SparseTargets(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0), torch.zeros(3, 0), 10)
    with pytest.raises(ValueError, match="1 <= k"):
        topk_targets(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="out of range"):
        SparseTargets(torch.tensor([[12]]), torch.zeros(1, 1), torch.ones(1, 1), 10)
    with pytest.raises(ValueError, match="built for 10"):
        sparse_kl(torch.randn(1, 7), SparseTargets(torch.tensor([[1]]), torch.zeros(1, 1), torch.ones(1, 1), 10))


class _CountingTeacher:
    def __init__(self):
        self.w = torch.randn(12, 10)
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x @ self.w


def test_cache_runs_the_teacher_once_and_reproduces_its_outputs(tmp_path):
    x = torch.randn(300, 12)
    teacher = _CountingTeacher()
    cache = TeacherCache.build(tmp_path / "c", teacher, x, k=10, batch_size=64, fingerprint="t1", progress=False)
    calls = teacher.calls
    again = TeacherCache.build(tmp_path / "c", teacher, x, k=10, batch_size=64, fingerprint="t1", progress=False)
    assert teacher.calls == calls and len(again) == 300
    assert not (tmp_path / "c.tmp").exists()
    assert isinstance(cache.indices, np.memmap) or isinstance(getattr(cache.indices, "base", None), np.memmap)
    rows = torch.tensor([5, 17, 299])
    full = x[rows] @ teacher.w
    assert torch.allclose(cache.full_logits(rows), full, atol=1e-5)
    want = topk_targets(full, 3, T=2.0)
    got = cache.topk_targets(rows, 3, T=2.0)
    assert torch.equal(got.indices, want.indices)
    assert torch.allclose(got.weights, want.weights, atol=1e-5)
    assert torch.equal(cache.labels(rows), full.argmax(-1))
    mass = cache.kept_mass(rows, 3)
    assert torch.allclose(mass, torch.softmax(full, -1).topk(3).values.sum(-1), atol=1e-5)
    TeacherCache.build(tmp_path / "c", teacher, x, k=10, fingerprint="t2", progress=False)
    assert teacher.calls > calls  # a different teacher fingerprint rebuilds


def test_truncated_cache_refuses_full_logits(tmp_path):
    cache = TeacherCache.build(tmp_path / "c", _CountingTeacher(), torch.randn(20, 12), k=2, progress=False)
    with pytest.raises(ValueError, match="top-2 of 10"):
        cache.full_logits(slice(None))
    with pytest.raises(ValueError, match="holds top-2"):
        cache.topk_targets(slice(None), 3)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache(tmp_path / "missing")
