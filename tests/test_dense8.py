"""Dense 8-bit Linear baselines (weights/dense8.py): close to the float layer in every format and granularity."""

import pytest
import torch

from sparsedistill.weights import swap_linears
from sparsedistill.weights.dense8 import Dense8Linear


@pytest.mark.parametrize("fmt,granularity,static,tol", [
    ("fp8", "tensor", True, 0.08), ("fp8", "row", False, 0.06), ("fp8", "row", True, 0.08),
    ("int8", "row", False, 0.02), ("int8", "row", True, 0.03), ("int8", "tensor", True, 0.04)])
def test_dense8_linear_is_close_to_the_float_layer(fmt, granularity, static, tol):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 20, 64)
    layer = Dense8Linear.from_linear(lin, fmt, float(x.abs().amax()) if static else None, granularity)
    ref = lin(x)
    out = layer(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = float((out - ref).norm() / ref.norm())
    assert err < tol, err
    assert err > 0  # really quantised
    if fmt == "fp8":
        assert layer.weight_q.dtype == torch.float8_e4m3fn
    else:
        assert layer.weight_q.dtype == torch.int8 and layer.weight_q.abs().max() <= 127


def test_dense8_swaps_into_a_model_and_refuses_bad_settings():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    ref = model(x)
    assert swap_linears(model, lambda n, lin: Dense8Linear.from_linear(lin, "int8")) == ["0", "2"]
    assert float((model(x) - ref).norm() / ref.norm()) < 0.03
    with pytest.raises(ValueError, match="format"):
        Dense8Linear.from_linear(torch.nn.Linear(4, 4), "int4")
    with pytest.raises(ValueError, match="calibrated input_scale"):
        Dense8Linear.from_linear(torch.nn.Linear(4, 4), "fp8", granularity="tensor")
    with pytest.raises(ValueError, match="> 0"):
        Dense8Linear.from_linear(torch.nn.Linear(4, 4), "fp8", input_scale=0.0)


def test_dense8_buffers_live_on_the_weights_device_and_the_weight_is_column_major():
    """Built from a model already on a GPU, every buffer must be there too (the meta device stands in for CUDA)."""
    for fmt, scale in (("fp8", 2.0), ("int8", 2.0), ("int8", None)):
        lin = torch.nn.Linear(32, 24, device="meta")
        layer = Dense8Linear.from_linear(lin, fmt, scale, "tensor" if scale else "row")
        assert {b.device.type for b in layer.buffers()} == {"meta"}, fmt
        assert layer.weight_q.stride() == (1, 32)  # (K, N) column-major, as torch._scaled_mm / _int_mm take it
