import pytest
import torch
from torch import nn

from sparsedistill.weights import nm_mask
from sparsedistill.weights.quant import QuantLinear, calibrate, fake_quant, swap_linears


def test_int8_fake_quant_matches_a_reference():
    x = torch.randn(64, 32) * 3
    scale = torch.rand(64, 1) * 0.05 + 0.01
    ref = torch.clamp(torch.round(x / scale), -127, 127) * scale
    assert torch.equal(fake_quant(x, scale, "int8"), ref)


def test_fp8_fake_quant_matches_the_e4m3_cast():
    x = torch.randn(1000) * 50
    scale = torch.tensor(0.5)
    ref = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quant(x, scale, "fp8"), ref)
    # E4M3 keeps 3 mantissa bits: relative rounding error at most 2^-4 inside the normal range
    big = x[(x / scale).abs() > 1]
    assert ((fake_quant(big, scale, "fp8") - big).abs() / big.abs()).max() <= 2**-4 + 1e-6


def test_gradients_pass_straight_through_and_reach_the_scale():
    x = torch.randn(16, requires_grad=True)
    scale = torch.tensor(0.02, requires_grad=True)
    fake_quant(x, scale, "int8").sum().backward()
    inside = (x / 0.02).abs() < 127
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())))
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_quant_linear_calibrates_then_matches_quantised_arithmetic():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    mask = nm_mask(lin.weight)
    q = QuantLinear.from_linear(lin, "int8", mask=mask)
    x = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="calibrate"):
        q(x)
    assert calibrate(nn.Sequential(q), [x]) == 1
    assert torch.allclose(q.input_scale, x.abs().max() / 127)
    # integer reference: int8 codes multiplied exactly, then rescaled
    xq = torch.round(x / q.input_scale).clamp(-127, 127)
    wq = torch.round(lin.weight * mask / q.weight_scale).clamp(-127, 127)
    ref = (xq.double() @ wq.double().t()) * q.input_scale.double() * q.weight_scale.double().t() + lin.bias.double()
    assert torch.allclose(q(x).double(), ref, atol=1e-5)
    assert (wq.reshape(16, -1, 4) != 0).sum(-1).max() <= 2  # the 2:4 mask survives quantisation
    masked = nn.functional.linear(x, lin.weight * mask, lin.bias)
    assert (q(x) - masked).norm() / masked.norm() < 0.02  # int8 costs about 1% here


def test_swap_linears_replaces_only_what_it_is_asked_to():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    names = swap_linears(model, lambda name, lin: QuantLinear.from_linear(lin, "fp8") if name == "0" else None)
    assert names == ["0"] and isinstance(model[0], QuantLinear) and type(model[2]) is nn.Linear
    calibrate(model, [torch.randn(4, 8)])
    assert model(torch.randn(4, 8)).shape == (4, 4)
    with pytest.raises(ValueError, match="no QuantLinear"):
        calibrate(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="int8' or 'fp8"):
        QuantLinear(4, 4, fmt="int4")


def test_checkpoints_with_plain_scales_still_load():
    from sparsedistill.weights.quant import QuantLinear

    q = QuantLinear(8, 4)
    old = {k: v for k, v in q.state_dict().items() if not k.startswith("log_")}
    old["weight_scale"], old["input_scale"] = torch.full((4, 1), 0.02), torch.tensor(0.5)
    fresh = QuantLinear(8, 4)
    fresh.load_state_dict(old)
    assert torch.allclose(fresh.weight_scale, torch.full((4, 1), 0.02)) and torch.allclose(fresh.input_scale, torch.tensor(0.5))
