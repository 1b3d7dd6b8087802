"""LiDAR corruptions as data: Robo3D's set at three severities, applied per agent in its own sensor frame.

Each corruption is a function of one scan (N, 5) = (x, y, z, intensity, ring) in the sensor's frame, the
severity level (1 light, 2 moderate, 3 heavy) and a seed: the same (scan, level, seed) always gives the same
corrupted scan, on any device (draws come from a CPU generator). Levels are Robo3D's where its numbers fit
our sensor, with DSRC's single test setting at level 2 where DSRC has one (docs/notes/dsrc-reading.md, section 4):

  beam_missing     whole rings lost: 1/4, 1/2 (DSRC: 32 of 64), 3/4 of the rings, drawn at random
  motion_blur      per-point jitter of x, y, z with sigma 0.1 / 0.2 (DSRC) / 0.3 m (DSRC's model; Robo3D's is a
                   global shift plus 0.1-sigma jitter with sigma 0.04-0.10 m)
  crosstalk        0.8 / 1.0 (DSRC) / 1.2 % of the points get N(0, 3) added to x, y, z and intensity (Robo3D's
                   noise; its levels are 0.6 / 0.8 / 1.0 %)
  cross_sensor     a sparser sensor: 1/4, 1/2 (DSRC), 3/4 of the rings dropped (fixed ones), then every second point
  fog              Hahner et al.'s model kept in kind: hard returns attenuated by exp(-2 alpha R), lost under the
                   receiver's threshold, and a share of rays returning from the fog near the sensor instead; alpha
                   0.01 / 0.03 / 0.06 per metre (Robo3D draws alpha per frame from 0-0.06), back-scatter 2 / 5 / 10 %
  snow             snowfall 0.5 / 1.0 / 2.5 mm/h (Robo3D): flakes as near returns on a share of rays growing with the
                   rate, and attenuation like a light fog (DSRC's snow code is not wired in)
  incomplete_echo  75 / 85 / 95 % of the points on cars lost (Robo3D; dark paint absorbs the pulse)
  wet_ground       water 0.2 / 1.0 / 1.2 mm (Robo3D): ground returns dimmed by the film, those under the noise floor
                   lost, more at grazing angles (long range)

The physics models (fog, snow, wet ground) are stand-ins with the same effects, not Robo3D's simulators (those
need precomputed integral tables and snowflake particle files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .geometry import points_in_boxes

__all__ = ["CORRUPTIONS", "LEVELS", "ScanContext", "corrupt", "corruption_names"]

LEVELS = (1, 2, 3)


@dataclass(frozen=True)
class ScanContext:
    """What some corruptions need besides the points: the sensor's ring count and height above the ground,
    and the cars' boxes in the sensor's frame (incomplete echo)."""

    rings: int = 32
    sensor_height: float = 1.9
    boxes: Tensor | None = None


def _draws(n: int, seed: int, device: torch.device, k: int = 1) -> Tensor:
    """(k, n) uniform draws from a CPU generator (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, n, generator=g).to(device)


def _normals(n: int, seed: int, device: torch.device, k: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g).to(device)


def beam_missing(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    share = (0.25, 0.5, 0.75)[level - 1]  # of the rings
    g = torch.Generator().manual_seed(seed)
    lost = torch.randperm(ctx.rings, generator=g)[: int(round(share * ctx.rings))].to(p.device)
    return p[~torch.isin(p[:, 4].long(), lost)]


def motion_blur(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    sigma = (0.1, 0.2, 0.3)[level - 1]  # metres
    out = p.clone()
    out[:, :3] += sigma * _normals(len(p), seed, p.device, 3).T
    return out


def crosstalk(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    share = (0.008, 0.010, 0.012)[level - 1]  # of the points
    hit = _draws(len(p), seed, p.device)[0] < share
    noise = 3.0 * _normals(len(p), seed + 1, p.device, 4).T
    out = p.clone()
    out[:, :4] = torch.where(hit[:, None], p[:, :4] + noise, p[:, :4])
    out[:, 3] = out[:, 3].clamp(0, 1)  # intensity stays a valid reading
    return out


def cross_sensor(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    ring = p[:, 4].long()
    kept_rings = ring % 4 != 1 if level == 1 else (ring % 2 == 0 if level == 2 else ring % 4 == 0)
    order = torch.arange(len(p), device=p.device)
    kept = p[kept_rings]
    return kept[order[: len(kept)] % 2 == 0]  # then every second point


def _attenuate(p: Tensor, beta: float, u: Tensor) -> Tensor:
    """Two-way attenuation exp(-2 beta R) of the intensity; a return below the receiver's threshold (relative to a
    clear-air return of its surface, with some spread) is lost. Returns the keep mask and scales intensity in place."""
    r = p[:, :3].norm(dim=1)
    gain = torch.exp(-2 * beta * r)
    p[:, 3] *= gain
    return gain > 0.05 + 0.1 * u


def _backscatter(p: Tensor, share: float, scale: float, u: Tensor) -> Tensor:
    """A share of rays return from the medium itself: the point moves to a short range (a Gamma(2, ``scale``) draw, mean
    2 ``scale``, at least 0.5 m, never beyond the hard target)."""
    hit = u[0] < share
    r = p[:, :3].norm(dim=1, keepdim=True).clamp(min=1e-6)
    near = (-scale * torch.log(u[1:2].T.clamp(min=1e-6) * u[2:3].T.clamp(min=1e-6))).clamp(min=0.5)  # sum of 2 exponentials
    near = torch.minimum(near, r)  # the medium cannot return from beyond the hard target
    p[:, :3] = torch.where(hit[:, None], p[:, :3] / r * near, p[:, :3])
    p[:, 3] = torch.where(hit, 0.02 + 0.05 * u[3], p[:, 3])
    return hit


def fog(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    alpha, share = ((0.01, 0.02), (0.03, 0.05), (0.06, 0.10))[level - 1]  # extinction per metre, back-scattering rays
    out = p.clone()
    u = _draws(len(p), seed, p.device, 5)
    keep = _attenuate(out, alpha, u[4])
    scattered = _backscatter(out, share, 1.0 / (4 * alpha) ** 0.5, u[:4])  # denser fog returns nearer
    return out[keep | scattered]


def snow(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    rate = (0.5, 1.0, 2.5)[level - 1]  # mm/h of snowfall
    out = p.clone()
    u = _draws(len(p), seed, p.device, 5)
    keep = _attenuate(out, 0.004 * rate, u[4])
    flakes = _backscatter(out, 0.02 * rate, 3.0, u[:4])  # flakes are seen within a few metres
    return out[keep | flakes]


def incomplete_echo(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    share = (0.75, 0.85, 0.95)[level - 1]  # of the points on cars
    if ctx.boxes is None:
        raise ValueError("incomplete_echo needs the cars' boxes in the sensor frame (ScanContext.boxes)")
    on_car = points_in_boxes(p, ctx.boxes, margin=0.1) >= 0
    return p[~(on_car & (_draws(len(p), seed, p.device)[0] < share))]


def wet_ground(p: Tensor, level: int, seed: int, ctx: ScanContext) -> Tensor:
    water_mm = (0.2, 1.0, 1.2)[level - 1]
    ground = p[:, 2] < -ctx.sensor_height + 0.1
    r = p[:, :3].norm(dim=1).clamp(min=1e-6)
    grazing = (ctx.sensor_height / r).clamp(max=1.0)  # sine of the incidence elevation
    # a thicker film mirrors more; grazing rays reflect away (lost), steep ones come back dimmer
    lose = (water_mm / 1.2) * (1.0 - grazing) ** 2
    u = _draws(len(p), seed, p.device)[0]
    out = p.clone()
    out[:, 3] = torch.where(ground, out[:, 3] * (1 - 0.7 * water_mm / 1.2), out[:, 3])
    return out[~(ground & (u < lose))]


CORRUPTIONS: dict[str, Callable[[Tensor, int, int, ScanContext], Tensor]] = {
    "beam_missing": beam_missing, "motion_blur": motion_blur, "crosstalk": crosstalk, "cross_sensor": cross_sensor,
    "fog": fog, "snow": snow, "incomplete_echo": incomplete_echo, "wet_ground": wet_ground,
}


def corruption_names() -> list[str]:
    return list(CORRUPTIONS)


def corrupt(points: Tensor, name: str, level: int, seed: int, ctx: ScanContext = ScanContext()) -> Tensor:
    """``points`` (N, 5) of one scan in its sensor frame after corruption ``name`` at ``level`` (1-3).

    An empty scan stays empty; a corruption may leave no points (a documented outcome the detector handles).
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; use one of {corruption_names()} (or 'clean')")
    if level not in LEVELS:
        raise ValueError(f"severity level must be one of {LEVELS} (light, moderate, heavy), got {level}")
    if points.ndim != 2 or points.shape[1] != 5:
        raise ValueError(f"expected a scan (N, 5) = (x, y, z, intensity, ring), got {tuple(points.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("the scan holds NaN or infinite values; drop those points before corrupting it")
    if len(points) == 0:
        return points
    if name in ("beam_missing", "cross_sensor") and int(points[:, 4].max()) >= ctx.rings:
        raise ValueError(f"the scan has ring ids up to {int(points[:, 4].max())} but ScanContext.rings is {ctx.rings}: "
                         "pass the sensor's ring count")
    return CORRUPTIONS[name](points, level, seed, ctx)

