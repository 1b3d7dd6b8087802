import pytest
import torch
from torch import nn

from sparsedistill.distill import multistage_distill, stage_levels
from sparsedistill.distill.multistage import Sparsifier
from sparsedistill.weights import MagnitudeSparsifier, NMSparsifier, is_nm_sparse, nm_mask


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def test_nm_mask_keeps_exactly_two_of_every_four():
    w = torch.randn(8, 32)
    mask = nm_mask(w)
    assert torch.equal(mask.reshape(8, 8, 4).sum(-1), torch.full((8, 8), 2))
    kept = (w * mask).abs().reshape(8, 8, 4)
    dropped = (w * ~mask).abs().reshape(8, 8, 4)
    assert (kept.topk(2, -1).values.amin(-1) >= dropped.amax(-1)).all()  # the two largest survive
    assert is_nm_sparse(w * mask) and not is_nm_sparse(w)


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm_mask(torch.randn(4, 30))
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm_mask(torch.randn(4, 8), 5, 4)


@pytest.mark.parametrize("path", ["geometric", "linear"])
def test_magnitude_sparsifier_walks_a_nested_path(path):
    model = _mlp()
    sp = MagnitudeSparsifier(0.9, path=path)
    previous = None
    for level in stage_levels(4):
        stats = sp.step_to(model, level)
        masks = {k: v.clone() for k, v in sp.masks.masks.items()}
        if previous:
            for k in masks:
                assert not (masks[k] & ~previous[k]).any()  # nothing pruned is revived
        previous = masks
        with torch.no_grad():  # "training": surviving weights move, some below pruned magnitudes
            for lin in (model[0], model[2]):
                lin.weight.mul_(torch.rand_like(lin.weight))
    assert abs(stats["sparsity"] - 0.9) < 0.01
    for lin in (model[0], model[2]):
        assert abs(float((lin.weight == 0).float().mean()) - 0.9) < 0.01
    # geometric keeps (1-0.9)^(1/4) of the weights after the first of 4 stages
    fresh = MagnitudeSparsifier(0.9, path=path)
    s1 = fresh.step_to(_mlp(), 0.25)["sparsity"]
    assert abs(s1 - (1 - 0.1**0.25 if path == "geometric" else 0.225)) < 0.01


def test_enforce_keeps_pruned_weights_at_zero_through_training():
    model = _mlp()
    sp = MagnitudeSparsifier(0.75)
    sp.step_to(model, 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        sp.enforce(model)
    for name, mask in sp.masks.masks.items():
        w = dict(model.named_modules())[name].weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()


def test_nm_sparsifier_reaches_exact_2_4_through_intermediate_levels():
    model = _mlp()
    sp = NMSparsifier(2, 4, include=lambda name, mod: name != "2")
    half = sp.step_to(model, 0.5)["sparsity"]
    assert abs(half - 0.25) < 0.01
    first = sp.masks.masks["0"].clone()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight))  # survivors shrink between stages
    assert sp.step_to(model, 1.0)["sparsity"] == pytest.approx(0.5)
    assert not (sp.masks.masks["0"] & ~first).any()  # the 2:4 mask contains every earlier pruning
    assert is_nm_sparse(model[0].weight) and not is_nm_sparse(model[2].weight)  # excluded layer stays dense


def test_sparsifiers_validate_input():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MagnitudeSparsifier(1.0)
    with pytest.raises(ValueError, match="level"):
        MagnitudeSparsifier(0.5).step_to(_mlp(), 1.5)
    with pytest.raises(ValueError, match="no prunable"):
        MagnitudeSparsifier(0.5).step_to(nn.Sequential(nn.ReLU()), 1.0)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        NMSparsifier().step_to(nn.Linear(30, 4), 1.0)


def test_stage_levels():
    assert stage_levels(1) == [1.0]
    assert stage_levels(4) == [0.25, 0.5, 0.75, 1.0]
    cubic = stage_levels(4, "cubic")
    assert cubic[-1] == 1.0 and cubic[0] > 0.25
    with pytest.raises(ValueError):
        stage_levels(0)


@pytest.mark.parametrize("source", ["previous", "original"])
def test_multistage_distill_hands_each_stage_the_right_teacher(source):
    teacher = _mlp()
    student = _mlp()
    student.load_state_dict(teacher.state_dict())
    sp: Sparsifier = MagnitudeSparsifier(0.8)
    seen = []

    def train_stage(i, model, stage_teacher, sparsifier):
        seen.append((i, stage_teacher, float((stage_teacher[0].weight == 0).float().mean())))
        with torch.no_grad():
            model[0].weight.add_(0.01)  # "training" changes the weights
        sparsifier.enforce(model)

    records = multistage_distill(student, teacher, sp, 3, train_stage, teacher_source=source)
    assert [r.stage for r in records] == [0, 1, 2]
    assert records[-1].stats["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert seen[0][1] is teacher
    if source == "original":
        assert all(t is teacher for _, t, _ in seen)
    else:
        assert seen[1][1] is not teacher and seen[2][1] is not seen[1][1]
        assert 0 < seen[1][2] < seen[2][2] < 0.8  # each teacher is the sparser previous student
