"""Procedural road scenes for simulated multi-vehicle LiDAR: what the ray caster hits, and the labels.

No LiDAR dataset with 3D boxes installs offline, so scenes are drawn from a seed: a straight road
(optionally crossed by a side street) with kerbs and sidewalks, buildings with gaps that occlude, parked
and moving cars (each two boxes: body and cabin), pedestrians, poles and trees as distractors, and 2-5
*connected* cars (agents) whose LiDARs see the scene from different places, the ego first.

Everything the sensor can hit is an oriented box or the ground plane z = 0. A scene is a handful of
small tensors built on the CPU from one ``torch.Generator``, so the same seed gives the same scene on
any machine; ray casting (``perception.lidar``) then runs on any device.

Conventions shared by the perception package: a 3D box is (x, y, z, l, w, h, yaw), centre in metres,
length along the heading, yaw counter-clockwise from +x; a pose is (x, y, z, yaw) of a sensor in the world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SceneConfig", "Scene", "SURFACES", "simulate_scene"]

# what each primitive is made of: (name, reflectivity range) -> intensity of its returns
SURFACES = {"ground": (0.08, 0.15), "kerb": (0.2, 0.3), "building": (0.25, 0.5), "car": (0.2, 0.9),
            "pedestrian": (0.15, 0.4), "pole": (0.4, 0.6), "tree": (0.1, 0.25)}
_KIND = {name: i for i, name in enumerate(SURFACES)}


@dataclass(frozen=True)
class SceneConfig:
    length: float = 160.0  # metres of road, centred on the ego
    lanes_per_direction: int = 2
    lane_width: float = 3.5
    parking: float = 2.4  # a parking strip between the outer lane and the kerb
    sidewalk: float = 3.0
    side_street_prob: float = 0.5  # a crossing street (more occlusion edges, cars at right angles)
    moving_cars: tuple[int, int] = (8, 20)
    parked_cars: tuple[int, int] = (6, 16)
    pedestrians: tuple[int, int] = (4, 12)
    poles: tuple[int, int] = (6, 14)
    trees: tuple[int, int] = (0, 10)
    agents: tuple[int, int] = (2, 5)  # connected cars, the ego included
    comm_range: float = 70.0  # collaborators are within this distance of the ego
    car_length: tuple[float, float] = (3.8, 5.2)
    car_width: tuple[float, float] = (1.65, 2.0)
    car_height: tuple[float, float] = (1.4, 1.8)
    sensor_height: float = 0.3  # LiDAR above the car's roof

    def __post_init__(self) -> None:
        lo, hi = self.agents
        if not 1 <= lo <= hi:
            raise ValueError(f"agents must be a range (min, max) with 1 <= min <= max, got {self.agents}")
        if self.moving_cars[0] < max(1, lo) or self.moving_cars[0] > self.moving_cars[1]:
            raise ValueError(f"moving_cars {self.moving_cars} must be a range whose minimum holds the agents (>= {max(1, lo)}): "
                             "the ego and its collaborators are moving cars")
        if self.comm_range <= 0 or self.length <= 2 * 10:
            raise ValueError(f"comm_range must be positive and length above 20 m, got {self.comm_range}, {self.length}")


@dataclass
class Scene:
    """What a sensor can hit and what a detector should find.

    ``primitives`` (P, 7) boxes in the world frame, ``kind`` (P,) their surface (index into SURFACES),
    ``reflectivity`` (P,), ``owner`` (P,) the car each belongs to (row of ``boxes``) or -1; ``boxes`` (K, 7)
    every car's 3D box (the labels; agents' own cars included: collaborators are objects for the ego);
    ``agents`` (A,) which cars carry the connected LiDARs, the ego first; ``poses`` (A, 4) their sensors.
    """

    primitives: Tensor
    kind: Tensor
    reflectivity: Tensor
    owner: Tensor
    boxes: Tensor
    agents: Tensor
    poses: Tensor
    seed: int

    @property
    def num_agents(self) -> int:
        return len(self.agents)


class _Draw:
    """Seeded draws on the CPU (the scene is the same on every machine)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, lo: float, hi: float, n: int = 1) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.g, dtype=torch.float64)

    def count(self, rng: tuple[int, int]) -> int:
        return int(torch.randint(rng[0], rng[1] + 1, (1,), generator=self.g))

    def chance(self, p: float) -> bool:
        return bool(torch.rand(1, generator=self.g) < p)


class _Builder:
    """Collects primitives and car labels; ``sizes`` are the (length, width, height) ranges of cars."""

    def __init__(self, draw: _Draw, sizes: tuple[tuple[float, float], ...]) -> None:
        self.draw, self.sizes = draw, sizes
        self.prims: list[list[float]] = []
        self.kinds: list[int] = []
        self.refl: list[float] = []
        self.owner: list[int] = []
        self.boxes: list[list[float]] = []

    def add(self, box: list[float], kind: str, owner: int = -1, refl: float | None = None) -> None:
        lo, hi = SURFACES[kind]
        self.prims.append(box)
        self.kinds.append(_KIND[kind])
        self.refl.append(float(self.draw.uniform(lo, hi)) if refl is None else refl)
        self.owner.append(owner)

    def car(self, x: float, y: float, yaw: float) -> int:
        d = self.draw
        l, w, h = (float(d.uniform(*r)) for r in self.sizes)
        k = len(self.boxes)
        self.boxes.append([x, y, h / 2, l, w, h, yaw])
        refl = float(d.uniform(*SURFACES["car"]))  # one paint per car
        body_h = 0.55 * h
        self.add([x, y, 0.15 + (body_h - 0.15) / 2, l, w, body_h - 0.15, yaw], "car", k, refl)  # body above the wheels
        cab_l, back = 0.55 * l, 0.08 * l  # cabin: shorter, narrower, set back from the bonnet
        cx, cy = x - back * math.cos(yaw), y - back * math.sin(yaw)
        self.add([cx, cy, body_h + (h - body_h) / 2, cab_l, 0.9 * w, h - body_h, yaw], "car", k, refl)
        for sx in (0.32, -0.32):  # wheels: what the LiDAR sees under the body
            wx, wy = x + sx * l * math.cos(yaw), y + sx * l * math.sin(yaw)
            self.add([wx, wy, 0.33, 0.66, w * 0.98, 0.66, yaw], "car", k, 0.05)
        return k


def _free(x: float, taken: list[tuple[float, float]], half: float) -> bool:
    return all(abs(x - c) > half + h for c, h in taken)


def simulate_scene(seed: int, cfg: SceneConfig = SceneConfig()) -> Scene:
    """A road scene drawn from ``seed`` (see the module docstring); deterministic on any machine."""
    d = _Draw(seed)
    b = _Builder(d, (cfg.car_length, cfg.car_width, cfg.car_height))
    half_len = cfg.length / 2
    road = cfg.lanes_per_direction * cfg.lane_width  # half the driven road's width
    kerb = road + cfg.parking  # where the sidewalk starts
    walk = kerb + cfg.sidewalk
    side_x = float(d.uniform(-40, 40)) if d.chance(cfg.side_street_prob) else None
    street_half = road  # the side street is as wide as the main one

    def on_side_street(x: float, margin: float = 0.0) -> bool:
        return side_x is not None and abs(x - side_x) < street_half + margin

    # kerbs / sidewalks (raised 15 cm), split where the side street crosses
    for sign in (1, -1):
        spans = [(-half_len, half_len)] if side_x is None else [(-half_len, side_x - street_half), (side_x + street_half, half_len)]
        for a, e in spans:
            b.add([(a + e) / 2, sign * (kerb + cfg.sidewalk / 2), 0.075, e - a, cfg.sidewalk, 0.15, 0.0], "kerb")
    # buildings beyond the sidewalks, with gaps; none across the side street
    for sign in (1, -1):
        x = -half_len
        while x < half_len:
            length, gap = float(d.uniform(8, 30)), float(d.uniform(1, 12))
            depth, height = float(d.uniform(8, 16)), float(d.uniform(4, 20))
            setback = float(d.uniform(0.5, 4))
            cx = x + length / 2
            if not on_side_street(cx, length / 2):
                b.add([cx, sign * (walk + setback + depth / 2), height / 2, length, depth, height, 0.0], "building")
            x += length + gap
    # moving cars in lanes (right-hand traffic: y < 0 drives +x), and on the side street
    lanes = [(sign * (i + 0.5) * cfg.lane_width, 0.0 if sign < 0 else math.pi)
             for sign in (-1, 1) for i in range(cfg.lanes_per_direction)]
    taken: dict[float, list[tuple[float, float]]] = {y: [] for y, _ in lanes}
    movers: list[int] = []
    target = d.count(cfg.moving_cars)
    for _ in range(target * 4):  # draws with rejection until the count is placed
        if len(movers) >= target:
            break
        y, yaw = lanes[int(torch.randint(len(lanes), (1,), generator=d.g))]
        x = float(d.uniform(-half_len + 5, half_len - 5))
        if _free(x, taken[y], 3.5) and not on_side_street(x, 1.0):
            taken[y].append((x, 3.5))
            movers.append(b.car(x, y + float(d.uniform(-0.3, 0.3)), yaw + float(d.uniform(-0.05, 0.05))))
    if side_x is not None:
        side_taken: dict[float, list[tuple[float, float]]] = {}
        for _ in range(d.count((1, 4))):
            lane = (1 if d.chance(0.5) else -1) * cfg.lane_width / 2
            y = float(d.uniform(walk + 2, 45)) * (1 if d.chance(0.5) else -1)
            if _free(y, side_taken.setdefault(lane, []), 3.5):
                side_taken[lane].append((y, 3.5))
                yaw = math.pi / 2 if lane > 0 else -math.pi / 2
                movers.append(b.car(side_x + lane, y, yaw + float(d.uniform(-0.05, 0.05))))
    # parked cars along the kerbs, facing with the traffic of their side
    parked_taken: dict[int, list[tuple[float, float]]] = {1: [], -1: []}
    for _ in range(d.count(cfg.parked_cars)):
        sign = 1 if d.chance(0.5) else -1
        x = float(d.uniform(-half_len + 5, half_len - 5))
        if _free(x, parked_taken[sign], 3.0) and not on_side_street(x, 3.0):
            parked_taken[sign].append((x, 3.0))
            yaw = (math.pi if sign > 0 else 0.0) + float(d.uniform(-0.08, 0.08))
            b.car(x, sign * (road + cfg.parking / 2), yaw)
    # distractors on the sidewalks: pedestrians, poles, trees (trunk + crown)
    def sidewalk_x() -> float:
        x = float(d.uniform(-half_len, half_len))
        return x if not on_side_street(x, 1.0) else x + 2 * street_half + 2.0

    for _ in range(d.count(cfg.pedestrians)):
        x, sign = sidewalk_x(), (1 if d.chance(0.5) else -1)
        y = sign * float(d.uniform(kerb + 0.4, walk - 0.3))
        b.add([x, y, 0.85 + 0.15, 0.45, 0.55, 1.7, float(d.uniform(-math.pi, math.pi))], "pedestrian")
    for _ in range(d.count(cfg.poles)):
        x, sign = sidewalk_x(), (1 if d.chance(0.5) else -1)
        h = float(d.uniform(4, 9))
        b.add([x, sign * (kerb + 0.5), h / 2 + 0.15, 0.25, 0.25, h, 0.0], "pole")
    for _ in range(d.count(cfg.trees)):
        x, sign = sidewalk_x(), (1 if d.chance(0.5) else -1)
        y = sign * (walk - 0.8)
        trunk = float(d.uniform(2, 3.5))
        b.add([x, y, trunk / 2 + 0.15, 0.35, 0.35, trunk, 0.0], "tree")
        crown = float(d.uniform(2.5, 5))
        b.add([x, y, trunk + crown / 2, crown, crown, crown * 0.8, float(d.uniform(0, math.pi / 2))], "tree")

    boxes = torch.tensor(b.boxes, dtype=torch.float64)
    # the ego: the moving car nearest the road's middle; collaborators: other moving cars within comm range
    mover_t = torch.tensor(movers)
    ego = int(mover_t[boxes[mover_t, 0].abs().argmin()])
    near = [m for m in movers if m != ego and math.dist(boxes[m, :2].tolist(), boxes[ego, :2].tolist()) <= cfg.comm_range]
    perm = torch.randperm(len(near), generator=d.g).tolist()
    want = d.count(cfg.agents) - 1
    agents = torch.tensor([ego] + [near[i] for i in perm[:want]])
    ab = boxes[agents]
    poses = torch.stack([ab[:, 0], ab[:, 1], ab[:, 5] + cfg.sensor_height, ab[:, 6]], 1)
    return Scene(primitives=torch.tensor(b.prims, dtype=torch.float32), kind=torch.tensor(b.kinds),
                 reflectivity=torch.tensor(b.refl, dtype=torch.float32), owner=torch.tensor(b.owner),
                 boxes=boxes.float(), agents=agents, poses=poses.float(), seed=seed)
