import math

import pytest
import torch
import torch.nn.functional as F

from sparsedistill.distill import HintLoss, attention_kl, ensemble_scores, forward_kl, js_divergence, logit_mse, normalize_scores, reverse_kl


def _kl_ref(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    return (p * (p.log() - torch.log_softmax(q_logits.double(), -1))).sum(-1).mean()


@pytest.fixture
def logits():
    return torch.randn(16, 10) * 3, torch.randn(16, 10) * 3


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_forward_kl_matches_reference_with_t2(logits, T):
    s, t = logits
    ref = _kl_ref(t / T, s / T) * T * T
    assert torch.allclose(forward_kl(s, t, T).double(), ref, atol=1e-5)
    assert torch.allclose(forward_kl(s, t, T, scale_t2=False).double(), ref / T**2, atol=1e-5)


def test_forward_kl_matches_torch_kl_div(logits):
    s, t = logits
    ref = F.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean") * 4
    assert torch.allclose(forward_kl(s, t, 2.0), ref, atol=1e-5)


def test_reverse_kl_swaps_arguments(logits):
    s, t = logits
    assert torch.allclose(reverse_kl(s, t, 3.0).double(), _kl_ref(s / 3, t / 3) * 9, atol=1e-5)


def test_js_is_symmetric_bounded_and_zero_on_equal(logits):
    s, t = logits
    assert torch.allclose(js_divergence(s, t), js_divergence(t, s), atol=1e-6)
    assert 0 < float(js_divergence(s, t)) <= math.log(2) + 1e-6
    assert float(js_divergence(s, s.clone())) < 1e-6
    p, q = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    m = (p + q) / 2
    ref = 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)).mean()
    assert torch.allclose(js_divergence(s, t).double(), ref, atol=1e-5)


def test_kd_losses_work_on_token_sequences():
    s, t = torch.randn(2, 7, 50), torch.randn(2, 7, 50)
    ref = _kl_ref(t.reshape(-1, 50), s.reshape(-1, 50))
    assert torch.allclose(forward_kl(s, t).double(), ref, atol=1e-5)


def test_logit_mse_is_shift_invariant_when_centered(logits):
    s, t = logits
    assert torch.allclose(logit_mse(s, t + 5.0), logit_mse(s, t), atol=1e-5)
    assert torch.allclose(logit_mse(s, t, center=False), F.mse_loss(s, t))


def test_hint_loss_learns_its_projection():
    torch.manual_seed(0)
    student = torch.randn(256, 8)
    teacher = student @ torch.randn(8, 16)
    hint = HintLoss(8, 16)
    opt = torch.optim.Adam(hint.parameters(), lr=0.05)
    first = hint(student, teacher).item()
    for _ in range(300):
        opt.zero_grad()
        loss = hint(student, teacher)
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first
    with pytest.raises(ValueError, match="student dim 8"):
        hint(torch.randn(4, 9), teacher[:4])


def test_attention_kl():
    t = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert float(attention_kl(t, t)) < 1e-6
    s = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    ref = (t * (t.log() - s.log())).sum(-1).mean()
    assert torch.allclose(attention_kl(s, t), ref, atol=1e-5)
    masked = t.clone()
    masked[:, :, 0] = 0  # fully masked query rows are ignored, not NaN
    assert torch.isfinite(attention_kl(s, masked))
    # teacher with 8 heads distills into a student with 4 (mean over head pairs)
    t8 = torch.softmax(torch.randn(2, 8, 5, 5), -1)
    assert torch.allclose(attention_kl(s, t8), attention_kl(s, t8.unflatten(1, (4, 2)).mean(2)))
    with pytest.raises(ValueError, match="multiple"):
        attention_kl(s, torch.softmax(torch.randn(2, 6, 5, 5), -1))


def test_score_normalisation_and_ensemble():
    dense = torch.tensor([[10.0, 20.0, 30.0], [0.1, 0.5, 0.2]])
    sparse = torch.tensor([[100.0, 50.0, 0.0], [3.0, 3.0, 9.0]])
    mm = normalize_scores(dense, "minmax")
    assert torch.allclose(mm.amin(-1), torch.zeros(2)) and torch.allclose(mm.amax(-1), torch.ones(2))
    z = normalize_scores(sparse, "zscore")
    assert torch.allclose(z.mean(-1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(z.std(-1, unbiased=False), torch.ones(2), atol=1e-5)
    ens = ensemble_scores([dense, sparse], "minmax", weights=[1.0, 2.0], scale=30.0)
    assert torch.allclose(ens, 30 * (normalize_scores(dense) + 2 * normalize_scores(sparse)))
    # a teacher's scale no longer matters after normalisation
    assert torch.allclose(ensemble_scores([dense * 1000, sparse]), ensemble_scores([dense, sparse]))


def test_bad_input_gives_clear_errors(logits):
    s, t = logits
    with pytest.raises(ValueError, match="10 classes but teacher has 12"):
        forward_kl(s, torch.randn(16, 12))
    with pytest.raises(ValueError, match="differ in shape"):
        forward_kl(s, torch.randn(8, 10))
    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        forward_kl(s, bad)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, T=0.0)
    with pytest.raises(ValueError, match="at least one teacher"):
        ensemble_scores([])
    with pytest.raises(ValueError, match="teacher 1 scores have shape"):
        ensemble_scores([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="minmax"):
        normalize_scores(t, "rank")


def test_t2_factor_defaults_to_power_only(logits):
    s, t = logits
    def odds(logits):  # q ∝ sigmoid(logit(p) / T), written out independently of the library
        p = torch.softmax(logits.double(), -1)
        q = torch.sigmoid(torch.log(p / (1 - p)) / 3.0)
        return q / q.sum(-1, keepdim=True)

    qt, qs = odds(t), odds(s)
    ref = (qt * (qt.log() - qs.log())).sum(-1).mean().float()
    assert torch.allclose(forward_kl(s, t, 3.0, "odds"), ref, atol=1e-6)
    assert torch.allclose(forward_kl(s, t, 3.0, "odds", scale_t2=True), 9 * ref, atol=1e-5)
