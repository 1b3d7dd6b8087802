"""Rectified flow: the teacher's training loss and the Euler sampler with classifier-free guidance.

Convention (as Wan and SD3): ``x_t = (1 - t) x0 + t noise`` for t in [0, 1], t = 1 pure noise; the
model predicts the velocity ``v = noise - x0``, so ``x0 = x_t - t v`` and an Euler step from t to
s < t is ``x_s = x_t + (s - t) v``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["flow_matching_loss", "guided_velocity", "time_grid", "euler_sample"]


def flow_matching_loss(model: nn.Module, x0: Tensor, y: Tensor, null_class: int, drop_class: float = 0.1,
                       generator: torch.Generator | None = None) -> Tensor:
    """MSE between the predicted and true velocity at logit-normal times (SD3); ``drop_class`` of labels become null (CFG)."""
    b = x0.shape[0]
    dev = x0.device
    t = torch.sigmoid(torch.randn(b, device=dev, generator=generator))
    noise = torch.randn(x0.shape, device=dev, dtype=x0.dtype, generator=generator)
    drop = torch.rand(b, device=dev, generator=generator) < drop_class
    y = torch.where(drop, torch.full_like(y, null_class), y)
    tt = t.view(b, *([1] * (x0.ndim - 1)))
    x_t = (1 - tt) * x0 + tt * noise
    return (model(x_t, t, y).float() - (noise - x0).float()).square().mean()


def guided_velocity(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, null_class: int, cfg: float) -> Tensor:
    """``v_null + cfg (v_class - v_null)`` in one batched forward (cfg = 1: the class-conditional velocity alone)."""
    if cfg == 1.0:
        return model(x, t, y)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    v_class, v_null = both.chunk(2)
    return v_null + cfg * (v_class - v_null)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` times from 1 to 0; ``shift`` > 1 spends more steps at high noise (SD3 / Wan's time shift)."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(model: nn.Module, noise: Tensor, y: Tensor, null_class: int, steps: int = 50, cfg: float = 5.0,
                 shift: float = 1.0, times: Tensor | None = None) -> Tensor:
    """x0 from ``noise`` by Euler steps of the (guided) velocity over ``time_grid(steps, shift)`` or ``times``."""
    times = time_grid(steps, shift, noise.device) if times is None else times.to(noise.device)
    if hasattr(model, "check_inputs"):  # once per sampler call (a host sync), not in every forward
        model.check_inputs(noise, times[0].expand(noise.shape[0]), y)
    x = noise
    for t, s in zip(times[:-1], times[1:]):
        tb = t.expand(x.shape[0])
        x = x + (s - t) * guided_velocity(model, x, tb, y, null_class, cfg)
    return x
