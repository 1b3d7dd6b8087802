"""TDM (trajectory distribution matching) for few-step rectified-flow students, as Video-BLADE trains them.

Three networks: the frozen many-step *teacher* (the real score, guided by CFG), the few-step
*student* and a *fake score* that learns the distribution of the student's outputs. One
iteration (``docs/notes/video-blade-reading.md``, section 1):

1. ``rollout``: the student runs its K steps from noise without gradients, keeping each step's input;
2. a step i per sample; the student re-predicts x0 from that step's input (with gradients);
3. x0 takes one student step to the interval's lower time, then is diffused (detached) to a random
   time between it and ``t_max``;
4. ``fake_score_loss``: the fake score learns to denoise those points toward the student's x0;
5. ``generator_loss``: pseudo-Huber between x0 and stopgrad(x0 + x0_teacher,cfg - x0_fake): the
   student moves toward what the teacher denoises to and away from what its own distribution does.

Times are continuous (t in [0, 1], t = 1 noise). Student step j runs from t_j = 1 - j / K to
t_{j+1}; ``eta`` mixes predicted and fresh noise in each step (eta = 1: the deterministic Euler step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .flow import guided_velocity

__all__ = ["TDMConfig", "student_times", "student_step", "rollout", "renoise", "fake_score_loss", "generator_loss",
           "pseudo_huber"]


@dataclass
class TDMConfig:
    steps: int = 4  # K, the student's sampling steps
    eta: float = 0.9  # share of predicted (vs fresh) noise in each student step
    cfg: float = 5.0  # guidance of the teacher (the real score)
    t_max: float = 0.98  # the highest time re-noised points reach
    huber_c: float = 1e-3  # pseudo-Huber constant before scaling: c = huber_c * sqrt(elements per sample) / 128


T_MIN = 1e-3  # the lowest time a re-noised point gets


def student_times(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """The K + 1 times of a K-step student, from 1 to 0 (uniform; the same grid in training and sampling)."""
    if steps < 1:
        raise ValueError(f"a student needs at least one step, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def student_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x0 estimate, x at ``t_next``) from velocity ``v`` at ``t``: x0 and the predicted noise, the noise mixed by ``eta``."""
    t, t_next = _bcast(t, x), _bcast(t_next, x)
    x0 = x - t * v
    eps = x + (1 - t) * v
    if eta < 1.0:
        if noise is None:
            raise ValueError("eta < 1 mixes in fresh noise: pass it")
        eps = eta * eps + math.sqrt(1 - eta**2) * noise
    return x0, (1 - t_next) * x0 + t_next * eps


@torch.no_grad()
def rollout(student: nn.Module, noise: Tensor, y: Tensor, steps: int, eta: float,
            generator: torch.Generator | None = None) -> tuple[list[Tensor], Tensor]:
    """The student's K steps from ``noise``: each step's input (K tensors) and the final x0."""
    times = student_times(steps, noise.device)
    x, inputs = noise, []
    for j in range(steps):
        inputs.append(x)
        t = times[j].expand(x.shape[0])
        fresh = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) if eta < 1 else None
        x0, x = student_step(x, student(x, t, y), t, times[j + 1].expand(x.shape[0]), eta, fresh)
    return inputs, x0


def renoise(x0: Tensor, eps: Tensor, t_low: Tensor, eta: float, t_max: float,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """x0 one student step down to ``t_low``, then diffused forward to a random t in [t_low, t_max]; (x_t, t), detached.

    Forward diffusion of the flow from s to t > s: ``x_t = a x_s + sqrt(t^2 - (a s)^2) z`` with a = (1 - t) / (1 - s).
    """
    b = x0.shape[0]
    dev, dt = x0.device, x0.dtype
    x0, eps = x0.detach(), eps.detach()
    if eta < 1.0:
        eps = eta * eps + math.sqrt(1 - eta**2) * torch.randn(x0.shape, device=dev, dtype=dt, generator=generator)
    s = t_low.to(dev)
    x_s = (1 - _bcast(s, x0)) * x0 + _bcast(s, x0) * eps
    # at least T_MIN: the fake score's target divides by t
    t = (s + (t_max - s).clamp(min=0) * torch.rand(b, device=dev, generator=generator)).clamp(min=T_MIN)
    a = (1 - t) / (1 - s).clamp(min=1e-6)
    sd = (t.square() - (a * s).square()).clamp(min=1e-8).sqrt()
    z = torch.randn(x0.shape, device=dev, dtype=dt, generator=generator)
    return _bcast(a, x0) * x_s + _bcast(sd, x0) * z, t


def fake_score_loss(fake: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, x0: Tensor) -> Tensor:
    """The fake score denoises the student's samples: MSE to the velocity that maps x_t to ``x0`` ((x_t - x0) / t)."""
    target = (x_t.float() - x0.detach().float()) / _bcast(t.float(), x_t)
    return (fake(x_t, t, y).float() - target).square().mean()


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    return ((diff.float().square() + c * c).sqrt() - c).mean()


def generator_loss(x0: Tensor, x_t: Tensor, t: Tensor, y: Tensor, teacher: nn.Module, fake: nn.Module,
                   null_class: int, cfg: float, huber_c: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Pseudo-Huber between the student's ``x0`` (with gradients) and stopgrad(x0 + x0_teacher,cfg - x0_fake) at (x_t, t).

    ``huber_c`` is scaled by sqrt(elements per sample) / 128, as BLADE scales TDM's 1e-3 to its latent size
    (0.0113 for Wan's 16 x 21 x 60 x 104 latent).
    """
    tb = _bcast(t, x_t)
    with torch.no_grad():
        x0_real = x_t - tb * guided_velocity(teacher, x_t, t, y, null_class, cfg)
        x0_fake = x_t - tb * fake(x_t, t, y)
        target = x0.detach() + (x0_real - x0_fake)
    c = huber_c * math.sqrt(x0[0].numel()) / 128
    loss = pseudo_huber(x0 - target, c)
    return loss, {"real_minus_fake": (x0_real - x0_fake).float().abs().mean()}
