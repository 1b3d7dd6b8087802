"""Videos from a trained generator, reproducibly: seeded noise, the teacher's and the students' samplers, and the
pictures (a PNG strip and an animated GIF) that reports and ``video sample`` write."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .flow import euler_sample
from .tdm import rollout

__all__ = ["seeded_noise", "student_step_noise", "sample_videos", "save_video_samples"]


def seeded_noise(shape: tuple[int, ...], seed: int, indices: range | list[int]) -> Tensor:
    """Noise of each video i drawn on the CPU from (seed, i): the same video on any device and in any batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in indices])


def student_step_noise(shape: tuple[int, ...], seed: int, indices: range | list[int], steps: int) -> list[Tensor]:
    """The fresh noise a K-step student mixes in at each step, per video i from (seed, i, step) on the CPU, in a seed
    range of its own (above 2^40) so it never repeats a video's starting noise: the same on any device and batch."""
    return [torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(2**40 + (seed * 1_000_003 + i) * 64 + j))
                         for i in indices]) for j in range(steps)]


@torch.no_grad()
def sample_videos(model: nn.Module, noise: Tensor, classes: Tensor, num_classes: int, steps: int, cfg: float = 1.0,
                  shift: float = 1.0, student_eta: float | None = None, fresh_noise: list[Tensor] | None = None) -> Tensor:
    """Videos in [-1, 1] (float32) from ``noise``. A teacher (``student_eta`` None) takes guided Euler steps; a TDM
    student its K training steps, each mixing ``student_eta`` of the predicted noise with ``fresh_noise[step]``
    (``student_step_noise``; required when ``student_eta`` < 1)."""
    if student_eta is None:
        x0 = euler_sample(model, noise, classes, num_classes, steps=steps, cfg=cfg, shift=shift)
    else:
        if hasattr(model, "check_inputs"):  # class ids, shapes (the teacher's sampler checks its own)
            model.check_inputs(noise, torch.ones(len(noise), device=noise.device), classes)
        if student_eta < 1 and fresh_noise is None:
            raise ValueError("a student step with eta < 1 mixes in fresh noise: pass fresh_noise (student_step_noise)")
        x0 = rollout(model, noise, classes, steps, student_eta, fresh_noise=fresh_noise)[1]
    return x0.float().clamp(-1, 1)


def save_video_samples(videos: Tensor, stem: Path) -> tuple[Path, Path]:
    """A PNG strip (one row per video, every frame) and an animated GIF (the videos side by side) of grey videos
    (N, 1, F, H, W) in [-1, 1]; returns their paths."""
    import numpy as np
    from PIL import Image

    if videos.ndim != 5 or videos.shape[1] != 1:
        raise ValueError(f"expected grey videos (N, 1, F, H, W), got {tuple(videos.shape)}")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    v = ((videos.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()[:, 0]  # (N, F, H, W)
    n, f, h, w = v.shape
    png, gif = stem.with_suffix(".png"), stem.with_suffix(".gif")
    Image.fromarray(v.permute(0, 2, 1, 3).reshape(n * h, f * w).numpy()).save(png)
    frames = [Image.fromarray(np.concatenate(list(v[:, i].numpy()), 1)) for i in range(f)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return png, gif
