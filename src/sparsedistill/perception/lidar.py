"""A spinning LiDAR cast into a ``Scene`` with PyTorch: the same code on the CPU and the GPU.

Why not Open3D's ``RaycastingScene`` (the field's usual ray caster): the GPU machine has no Open3D and its
wheel is ~400 MB, while the training set is generated there at the start of each run. A scene here is
only oriented boxes and the ground plane, so exact ray-box (slab) tests in batched tensor code are enough
and run on whatever device holds the rays; ``tests/test_perception_sim.py`` checks the hits against an
independent ray-triangle reference and, where it is installed, against Open3D.

A scan: ``rings`` beams at fixed elevations, ``azimuths`` firings per turn; each ray returns its first
hit within ``max_range`` (none: no point), with Gaussian range noise, random dropout, and an intensity
from the surface's reflectivity and the angle of incidence. Points come in the sensor's frame (x along
the car's heading, z up) as (x, y, z, intensity, ring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import rotate_z
from .scene import SURFACES, Scene

__all__ = ["LidarConfig", "ray_directions", "cast_rays", "scan", "POINT_FIELDS"]

POINT_FIELDS = ("x", "y", "z", "intensity", "ring")


@dataclass(frozen=True)
class LidarConfig:
    rings: int = 32
    elevation: tuple[float, float] = (-25.0, 10.0)  # degrees of the lowest and highest ring
    azimuths: int = 1024  # firings per turn
    max_range: float = 100.0
    range_noise: float = 0.02  # metres (1 sigma)
    dropout: float = 0.02  # share of returns lost at random
    chunk: int = 16384  # rays per batch of box tests (bounds memory: rays x boxes x 3 per temporary)

    def __post_init__(self) -> None:
        if self.rings not in (16, 32, 64, 128):
            raise ValueError(f"rings must be 16, 32, 64 or 128, got {self.rings}")
        if not (-90 < self.elevation[0] < self.elevation[1] < 90) or self.azimuths < 8 or self.max_range <= 0:
            raise ValueError(f"bad LiDAR geometry: elevation {self.elevation} (low < high, within +-90), "
                             f"azimuths {self.azimuths} (>= 8), max_range {self.max_range} (> 0)")


def ray_directions(cfg: LidarConfig, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Unit directions (rings * azimuths, 3) in the sensor frame, and each ray's ring index."""
    el = torch.deg2rad(torch.linspace(cfg.elevation[0], cfg.elevation[1], cfg.rings, device=device, dtype=torch.float64))
    az = torch.arange(cfg.azimuths, device=device, dtype=torch.float64) * (2 * math.pi / cfg.azimuths)
    el, az = torch.meshgrid(el, az, indexing="ij")
    d = torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1).reshape(-1, 3)
    ring = torch.arange(cfg.rings, device=device).repeat_interleave(cfg.azimuths)
    return d.float(), ring


def cast_rays(origin: Tensor, dirs: Tensor, boxes: Tensor, max_range: float,
              chunk: int = 16384) -> tuple[Tensor, Tensor, Tensor]:
    """First hits of rays from ``origin`` (3,) along unit ``dirs`` (R, 3) on ``boxes`` (P, 7) and the ground z = 0.

    Returns (distance (R,), hit primitive (R,) with -1 for the ground and -2 for nothing within
    ``max_range``, surface normal (R, 3)). Boxes that contain the origin are ignored (a sensor inside one
    sees out of it).
    """
    dev = dirs.device
    r = len(dirs)
    dist = torch.full((r,), math.inf, device=dev)
    hit = torch.full((r,), -2, dtype=torch.long, device=dev)
    normal = torch.zeros(r, 3, device=dev)
    # ground plane: rays going down
    down = dirs[:, 2] < -1e-9
    t_ground = torch.where(down, -origin[2] / dirs[:, 2].clamp(max=-1e-9), torch.full_like(dist, math.inf))
    dist, hit = torch.where(t_ground < dist, t_ground, dist), torch.where(t_ground < dist, -1, hit)
    normal[hit == -1] = torch.tensor([0.0, 0.0, 1.0], device=dev)
    if len(boxes):
        yaw = boxes[:, 6]
        half = boxes[:, 3:6] / 2  # (P, 3)
        rel = origin[None] - boxes[:, :3]  # the origin in each box's frame: rotate by -yaw
        o = torch.cat([rotate_z(rel[:, :2], -yaw), rel[:, 2:]], -1)  # (P, 3)
        inside = (o.abs() < half).all(-1)
        for a in range(0, r, chunk):
            d = dirs[a : a + chunk]
            dl = torch.cat([rotate_z(d[:, None, :2], -yaw[None]), d[:, None, 2:].expand(-1, len(boxes), 1)], -1)  # (n, P, 3)
            inv = 1.0 / torch.where(dl.abs() < 1e-12, torch.full_like(dl, 1e-12), dl)
            t1, t2 = (-half[None] - o[None]) * inv, (half[None] - o[None]) * inv
            t_near, axis = torch.minimum(t1, t2).max(-1)  # entering: the last slab crossed
            t_far = torch.maximum(t1, t2).amin(-1)
            ok = (t_near <= t_far) & (t_near > 1e-6) & ~inside[None]
            t_near = torch.where(ok, t_near, torch.full_like(t_near, math.inf))
            best, which = t_near.min(-1)
            closer = best < dist[a : a + chunk]
            dist[a : a + chunk] = torch.where(closer, best, dist[a : a + chunk])
            hit[a : a + chunk] = torch.where(closer, which, hit[a : a + chunk])
            # the entered face's normal, back in the world: -sign(d) along that axis of the box
            ax = axis.gather(1, which[:, None]).squeeze(1)
            dsel = dl[torch.arange(len(d), device=dev), which]
            n_local = torch.zeros(len(d), 3, device=dev)
            n_local.scatter_(1, ax[:, None], -torch.sign(dsel.gather(1, ax[:, None])))
            n_world = torch.cat([rotate_z(n_local[:, :2], yaw[which]), n_local[:, 2:]], -1)
            normal[a : a + chunk] = torch.where(closer[:, None], n_world, normal[a : a + chunk])
    far = dist > max_range
    hit[far] = -2
    return dist, hit, normal


def scan(scene: Scene, agent: int, cfg: LidarConfig = LidarConfig(), seed: int = 0,
         device: torch.device | str = "cpu") -> Tensor:
    """Agent ``agent``'s points (N, 5) = (x, y, z, intensity, ring) in its sensor frame.

    Its own car is not in its view (real scans crop it too). Noise and dropout are drawn on the CPU from
    ``seed``, so a scan is the same on every device up to float rounding.
    """
    if not 0 <= agent < scene.num_agents:
        raise ValueError(f"agent {agent} does not exist: this scene has {scene.num_agents} agents (0 = ego)")
    dirs_s, ring = ray_directions(cfg, device)
    pose = scene.poses[agent].to(device)
    dirs = torch.cat([rotate_z(dirs_s[:, :2], pose[3]), dirs_s[:, 2:]], -1)
    others = (scene.owner != scene.agents[agent]).to(device)
    prims = scene.primitives.to(device)[others]
    dist, hit, normal = cast_rays(pose[:3], dirs, prims, cfg.max_range, cfg.chunk)
    g = torch.Generator().manual_seed(seed)
    noise = (torch.randn(len(dirs), generator=g) * cfg.range_noise).to(device)
    keep_draw = torch.rand(len(dirs), generator=g).to(device)
    jitter = (0.9 + 0.2 * torch.rand(len(dirs), generator=g)).to(device)
    keep = (hit > -2) & (keep_draw >= cfg.dropout)
    ground = sum(SURFACES["ground"]) / 2  # the road: one asphalt everywhere
    refl = torch.where(hit == -1, torch.full_like(dist, ground),
                       scene.reflectivity.to(device)[others][hit.clamp(min=0)])
    cos_inc = (normal * dirs).sum(-1).abs()
    intensity = (refl * (0.3 + 0.7 * cos_inc) * jitter).clamp(0, 1)
    rng = (dist + noise).clamp(min=0.1)
    pts = dirs_s * rng[:, None]
    out = torch.cat([pts, intensity[:, None], ring[:, None].float()], 1)
    return out[keep]
