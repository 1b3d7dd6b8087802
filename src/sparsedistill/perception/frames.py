"""Multi-agent LiDAR frames: one scene, every connected car's scan, the labels, in one seeded unit.

A frame is what a cooperative detector receives at one instant: each agent's points in its own sensor
frame, the agents' poses (the ego first) and the cars' boxes. Frames are drawn from integer seeds, and the
splits use disjoint seed ranges, so a training set is a range of numbers, made where it is used (the GPU
machine makes its own at the start of a run: datasets do not travel there).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..runs import atomic_torch_save
from .corruptions import ScanContext, corrupt
from .geometry import boxes_between, points_between
from .lidar import LidarConfig, scan
from .scene import SceneConfig, simulate_scene

__all__ = ["Frame", "SimConfig", "simulate_frame", "simulate_frames", "corrupt_frame", "split_seeds", "SPLITS",
           "frames_per_second"]

SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # first seed of each split


@dataclass(frozen=True)
class SimConfig:
    scene: SceneConfig = field(default_factory=SceneConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)


@dataclass
class Frame:
    """``points[a]`` (N_a, 5) = (x, y, z, intensity, ring) in agent a's sensor frame; ``poses`` (A, 4); ``boxes`` (K, 7)
    in the world, ``agent_boxes`` (A,) the row of each agent's own car in ``boxes``."""

    points: list[Tensor]
    poses: Tensor
    boxes: Tensor
    agent_boxes: Tensor
    seed: int

    @property
    def num_agents(self) -> int:
        return len(self.points)

    def to(self, device: torch.device | str) -> "Frame":
        return Frame([p.to(device) for p in self.points], self.poses.to(device), self.boxes.to(device),
                     self.agent_boxes.to(device), self.seed)

    def points_in_ego(self, agent: int) -> Tensor:
        """Agent ``agent``'s points moved into the ego's sensor frame (the cooperative detector's common frame)."""
        return points_between(self.points[agent], self.poses[agent], self.poses[0])

    def boxes_in_ego(self) -> Tensor:
        """Every car but the ego's own, in the ego's sensor frame (what the ego should detect)."""
        others = torch.ones(len(self.boxes), dtype=torch.bool, device=self.boxes.device)
        others[self.agent_boxes[0]] = False
        return boxes_between(self.boxes[others], None, self.poses[0])


def simulate_frame(seed: int, cfg: SimConfig = SimConfig(), device: torch.device | str = "cpu") -> Frame:
    """The frame of ``seed``: its scene and each agent's scan (noise seeded by (seed, agent))."""
    scene = simulate_scene(seed, cfg.scene)
    points = [scan(scene, a, cfg.lidar, seed=seed * 7 + a, device=device) for a in range(scene.num_agents)]
    return Frame(points, scene.poses.to(device), scene.boxes.to(device), scene.agents.to(device), seed)


def simulate_frames(seeds: Sequence[int], cfg: SimConfig, device: torch.device | str = "cpu",
                    cache_dir: Path | None = None, shard: int = 50) -> list[Frame]:
    """The frames of ``seeds``. With ``cache_dir`` they are simulated once per (simulator code, config, seeds, device
    type) and kept there in files of ``shard`` frames. Processes that ask at the same time (jobs side by side on one
    GPU) share the work: each simulates the shards no other process has taken (a file lock per shard), then loads
    the rest, waiting for the shards still being simulated; a run cut and resumed keeps the finished shards."""
    if cache_dir is None:
        return [simulate_frame(s, cfg, device) for s in seeds]
    if shard < 1:
        raise ValueError(f"shard must be at least 1 frame, got {shard}")
    device = torch.device(device)
    key = _frames_key(seeds, cfg, device)
    parts = [list(seeds[i:i + shard]) for i in range(0, len(seeds), shard)]
    paths = [Path(cache_dir) / f"frames-{key}-n{shard}-{i:04d}.pt" for i in range(len(parts))]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)

    def simulate_into(path: Path, part: list[int]) -> list[Frame]:
        frames = [simulate_frame(s, cfg, device) for s in part]
        atomic_torch_save([(f.to("cpu").points, f.poses.cpu(), f.boxes.cpu(), f.agent_boxes.cpu(), f.seed)
                           for f in frames], path)
        return frames

    done: dict[Path, list[Frame]] = {}
    for path, part in zip(paths, parts):  # first the shards nobody holds
        if not path.exists():
            with _file_lock(path.with_suffix(".lock"), wait=False) as lock:
                if lock.held and not path.exists():
                    done[path] = simulate_into(path, part)
    frames: list[Frame] = []
    for path, part in zip(paths, parts):  # then every shard, waiting for those another process is simulating
        if path not in done:
            with _file_lock(path.with_suffix(".lock")):
                if not path.exists():  # its holder died
                    done[path] = simulate_into(path, part)
        frames += done.get(path) or [Frame(*row).to(device) for row in torch.load(path, map_location="cpu", weights_only=True)]
    return frames


def _frames_key(seeds: Sequence[int], cfg: SimConfig, device: torch.device) -> str:
    """What a cached set of frames depends on, hashed: the simulator's source, its config, the seeds, the device type."""
    h = hashlib.sha256(repr((cfg, list(seeds), device.type)).encode())
    for name in ("frames.py", "scene.py", "lidar.py", "geometry.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


class _file_lock:
    """An exclusive flock on ``path`` (released by the kernel if the holder dies, so a cut process never blocks).
    ``wait=False``: take it only if free; ``held`` says whether it was."""

    def __init__(self, path: Path, wait: bool = True) -> None:
        self.path, self.wait, self.held = path, wait, False

    def __enter__(self) -> "_file_lock":
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
        except BlockingIOError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the flock


def corrupt_frame(frame: Frame, name: str, level: int, rings: int, seed: int | None = None) -> Frame:
    """``frame`` with every agent's scan corrupted in its own sensor frame (as DSRC and Robo3D do), ``name`` at ``level``.

    ``name`` "clean" returns the frame itself. The draws depend on (``seed`` or the frame's seed, agent) only.
    """
    if name == "clean":
        return frame
    base = frame.seed if seed is None else seed
    points = []
    for a, p in enumerate(frame.points):
        pose = frame.poses[a]
        ctx = ScanContext(rings=rings, sensor_height=float(pose[2]), boxes=boxes_between(frame.boxes, None, pose))
        points.append(corrupt(p, name, level, seed=base * 131 + a * 17 + level, ctx=ctx))
    return Frame(points, frame.poses, frame.boxes, frame.agent_boxes, frame.seed)


def split_seeds(split: str, count: int) -> range:
    """The seeds of the first ``count`` frames of ``split`` (train / val / test: disjoint ranges)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if not 0 < count <= 1_000_000:
        raise ValueError(f"count must be between 1 and 1,000,000 frames per split, got {count}")
    return range(SPLITS[split], SPLITS[split] + count)


def frames_per_second(count: int, cfg: SimConfig = SimConfig(), device: torch.device | str = "cpu") -> float:
    """Simulated frames per second on ``device`` (scene drawing + every agent's scan), after one warm-up frame."""
    simulate_frame(0, cfg, device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(1, count + 1):
        simulate_frame(s, cfg, device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)
