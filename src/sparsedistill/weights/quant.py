"""Fake quantisation for sparse-distillation-aware QAT: INT8 and FP8 (E4M3), one module swap.

``QuantLinear`` replaces an ``nn.Linear``: weights are quantised per output channel, inputs per
tensor, both with scales that are first calibrated (max of observed values) and then learned
(LSQ-style: the straight-through estimator for values, a gradient for the scale). Scales are
learned as logarithms: they stay positive, and Adam's steps become relative changes (an absolute
step of 1e-4 would flip a 1e-3 weight scale negative within a few steps). A frozen 2:4 (or any)
mask can ride along, so pruning and quantisation are trained together. The forward pass computes
exactly what the deployed integer / FP8 kernel will: ``dequant(quant(x)) @ dequant(quant(w))^T``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

__all__ = ["QuantFormat", "fake_quant", "QuantLinear", "swap_linears", "calibrate"]

QuantFormat = Literal["int8", "fp8"]
QMAX = {"int8": 127.0, "fp8": 448.0}  # symmetric int8; float8_e4m3fn's largest finite value


def _round_ste(x: Tensor) -> Tensor:
    return x + (x.round() - x).detach()


def _fp8_ste(x: Tensor) -> Tensor:
    return x + (x.to(torch.float8_e4m3fn).to(x.dtype) - x).detach()


def fake_quant(x: Tensor, scale: Tensor, fmt: QuantFormat = "int8") -> Tensor:
    """``scale * Q(x / scale)``: round to int8 (clamped to +-127) or to the nearest E4M3 value.

    Gradients pass straight through the rounding; ``scale`` gets the LSQ gradient (values that
    clip pull it up, rounding error moves it either way). ``scale`` broadcasts against ``x``.
    """
    if fmt not in QMAX:
        raise ValueError(f"unknown quantisation format {fmt!r}; use 'int8' or 'fp8'")
    if not bool((scale > 0).all()):
        raise ValueError("quantisation scales must be positive; calibrate before training")
    return _fake_quant(x, scale, fmt)


def _fake_quant(x: Tensor, scale: Tensor, fmt: QuantFormat) -> Tensor:  # unchecked: no GPU sync per call
    q = (x / scale).clamp(-QMAX[fmt], QMAX[fmt])
    q = _round_ste(q) if fmt == "int8" else _fp8_ste(q)
    return q * scale


class QuantLinear(nn.Linear):
    """A Linear whose weights and inputs are fake-quantised (and weights optionally masked)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: QuantFormat = "int8",
                 mask: Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        if fmt not in QMAX:
            raise ValueError(f"unknown quantisation format {fmt!r}; use 'int8' or 'fp8'")
        self.fmt = fmt
        self.log_weight_scale = nn.Parameter(torch.zeros(out_features, 1))
        self.log_input_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("mask", mask.bool() if mask is not None else None)
        self.register_buffer("calibrated", torch.tensor(False))
        self._observing = False
        self._ready = False
        self.register_buffer("_input_absmax", torch.zeros(()), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat = "int8", mask: Tensor | None = None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, mask)
        q.to(linear.weight.device)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
            q.log_weight_scale.copy_(_weight_scale(q.masked_weight(), fmt).log())
        return q

    @property
    def weight_scale(self) -> Tensor:
        return self.log_weight_scale.exp()

    @property
    def input_scale(self) -> Tensor:
        return self.log_input_scale.exp()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the log-scale parametrisation stored the scales themselves
        for name in ("weight_scale", "input_scale"):
            old = state_dict.pop(prefix + name, None)
            if old is not None and prefix + "log_" + name not in state_dict:
                state_dict[prefix + "log_" + name] = old.clamp(min=1e-12).log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def masked_weight(self) -> Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        if self._observing:
            self._input_absmax = torch.maximum(self._input_absmax, x.detach().abs().amax())
            return nn.functional.linear(x, self.masked_weight(), self.bias)
        if not self._ready:  # reads the flag once: a GPU sync per call would stall training
            self._ready = bool(self.calibrated)
        if not self._ready:
            raise RuntimeError("QuantLinear is not calibrated: run sparsedistill.weights.quant.calibrate(model, batches) first")
        w = _fake_quant(self.masked_weight(), self.weight_scale, self.fmt)  # exp(log scale): always positive
        return nn.functional.linear(_fake_quant(x, self.input_scale, self.fmt), w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt}, masked={self.mask is not None}"


def _weight_scale(w: Tensor, fmt: QuantFormat) -> Tensor:
    return (w.detach().abs().amax(dim=1, keepdim=True) / QMAX[fmt]).clamp(min=1e-8)


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> list[str]:
    """Replace every ``nn.Linear`` (subclasses included) for which ``make(name, linear)`` returns a module.

    Returns the names of the replaced layers.

    The one place where this project swaps modules (fake-quant for QAT, sparse kernels at export).
    """
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            new = make(name, mod)
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
                swapped.append(name)
    return swapped


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[Tensor] | list[tuple], forward: Callable | None = None) -> int:
    """Set every QuantLinear's input scale from the largest input seen on ``batches``; returns how many.

    Weight scales are set per output channel from the (masked) weights. Afterwards both kinds of
    scale are trainable (LSQ, as logarithms).
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no QuantLinear layers; swap them in with swap_linears first")
    for m in layers:
        m._observing, m._input_absmax = True, torch.zeros_like(m._input_absmax)
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            (forward or model)(b)
    finally:
        for m in layers:
            m._observing = False
        model.train(was_training)
    for m in layers:
        if m._input_absmax <= 0:
            raise ValueError("calibration saw only zeros at a quantised layer; give it real batches")
        m.log_input_scale.copy_((m._input_absmax / QMAX[m.fmt]).log())
        m.log_weight_scale.copy_(_weight_scale(m.masked_weight(), m.fmt).log())
        m.calibrated.fill_(True)
    return len(layers)
