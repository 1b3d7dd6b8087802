"""A cooperative LiDAR car detector in one file: DSRC's network (PointPillars -> multi-scale BEV backbone ->
per-scale fusion across agents -> anchor head), with its optional point-cloud reconstruction head.

Input: the points of every agent of every frame, already moved into each frame's ego sensor frame, as one
(N, F) tensor with the index of its cloud (frames in order, the ego first in each) and the agent count per
frame. F = 4 (x, y, z, intensity) for a detector on real scans, 5 for DSRC's teacher, whose 5th channel
marks points inside ground-truth boxes. Each agent's cloud becomes a BEV map (``perception.pillars``); three
residual stages (stride 2 each) give three scales; at each scale the agents' maps are fused per cell
(``perception.fusion``: attention, none = ego alone, max); the fused scales are upsampled to the first one,
concatenated, shrunk, and 1x1 heads give per-anchor logits and box deltas (``perception.anchors``).
Early fusion needs no option here: give each frame one cloud holding every agent's points.

The outputs keep what distillation reads: each scale's per-agent features before fusion, the fused ones,
and the final BEV map. (DSRC's backbone is a Res2Net; plain residual blocks here, see docs/notes/dsrc.md.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..perception.anchors import AnchorConfig
from ..perception.fusion import FUSIONS
from ..perception.pillars import BEVGrid, PillarEncoder
from .registry import register_model

__all__ = ["CoopDetectorConfig", "CoopDetector"]


@dataclass(frozen=True)
class CoopDetectorConfig:
    grid: BEVGrid = field(default_factory=BEVGrid)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    in_features: int = 4  # 5 for DSRC's painted teacher
    pillar_channels: int = 64
    channels: tuple[int, int, int] = (64, 128, 256)
    blocks: tuple[int, int, int] = (3, 4, 5)
    up_channels: int = 128
    head_channels: int = 256
    fusion: str = "attention"
    reconstruction: bool = False  # DSRC's feature-to-point-cloud head
    # BEV maps and conv weights in NHWC, cuDNN's own layout on tensor cores: no layout transposes around each conv
    # (the same numbers up to the order of sums; benchmarks/dsrc_speed.py --layouts times both)
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; use one of {list(FUSIONS)}")
        if self.in_features not in (4, 5):
            raise ValueError(f"in_features is 4 (x, y, z, intensity) or 5 (with DSRC's painted channel), got {self.in_features}")
        if self.anchors.stride != 2:
            raise ValueError("the head works at half the pillar grid's resolution: anchors.stride must be 2")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.a, self.b = _conv_bn(cin, cout, stride), _conv_bn(cout, cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.b(torch.relu(self.a(x))) + self.skip(x))


class CoopDetector(nn.Module):
    def __init__(self, cfg: CoopDetectorConfig = CoopDetectorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PillarEncoder(cfg.grid, cfg.in_features, cfg.pillar_channels, cfg.channels_last)
        cins = (cfg.pillar_channels, *cfg.channels[:-1])
        self.stages = nn.ModuleList(
            nn.Sequential(ResBlock(cin, cout, 2), *(ResBlock(cout, cout) for _ in range(n - 1)))
            for cin, cout, n in zip(cins, cfg.channels, cfg.blocks))
        self.ups = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c, cfg.up_channels, 2**i, 2**i, bias=False),
                          nn.BatchNorm2d(cfg.up_channels, eps=1e-3, momentum=0.01), nn.ReLU())
            for i, c in enumerate(cfg.channels))
        self.shrink = nn.Sequential(nn.Conv2d(3 * cfg.up_channels, cfg.head_channels, 3, 1, 1), nn.ReLU(),
                                    nn.Conv2d(cfg.head_channels, cfg.head_channels, 3, 1, 1), nn.ReLU())
        a = len(cfg.anchors.yaws)
        self.cls_head = nn.Conv2d(cfg.head_channels, a, 1)
        self.reg_head = nn.Conv2d(cfg.head_channels, 7 * a, 1)
        nn.init.constant_(self.cls_head.bias, -4.6)  # a prior of 1 % cars: the focal loss starts calm
        # occupancy logit and mean-point offset (x, y, z) per pillar, from the fused map, back at pillar resolution
        self.recon = nn.ConvTranspose2d(cfg.head_channels, 4, 2, 2) if cfg.reconstruction else None
        self.fuse = FUSIONS[cfg.fusion]
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)  # the 4-d weights; ``.to(device)`` keeps it

    def forward(self, points: Tensor, cloud: Tensor, agents: list[int]) -> dict[str, Tensor | list[Tensor]]:
        """Points (N, F) in their frame's ego frame, ``cloud`` (N,) index of each point's cloud, ``agents`` clouds per frame.

        Returns ``cls`` (B, A, H', W'), ``reg`` (B, 7A, H', W'), ``agent_features`` (per scale, (clouds, C, h, w),
        before fusion), ``fused_features`` (per scale, (B, C, h, w)), ``bev`` (B, C, H', W'), and with
        reconstruction ``recon`` (B, 4, H, W).
        """
        if any(n < 1 for n in agents) or sum(agents) < 1:
            raise ValueError(f"every frame needs at least its ego's cloud, got agents per frame {agents}")
        # the pillar encoder checks the cloud indices (in the one read from the device it makes anyway)
        x = self.encoder(points, cloud, sum(agents))
        agent_features, fused = [], []
        for stage in self.stages:
            x = stage(x)
            agent_features.append(x)
            fused.append(self.fuse(x, agents))
        bev = self.shrink(torch.cat([up(f) for up, f in zip(self.ups, fused)], 1))
        out: dict[str, Tensor | list[Tensor]] = {"cls": self.cls_head(bev), "reg": self.reg_head(bev),
                                                 "agent_features": agent_features, "fused_features": fused, "bev": bev}
        if self.recon is not None:
            out["recon"] = self.recon(bev)
        return out


@register_model
def coop_detector(**kw) -> CoopDetector:
    """DSRC's detector shape (pillars of 0.4 m, stages of 3 / 4 / 5 residual blocks at 64 / 128 / 256 channels, attention fusion)."""
    return CoopDetector(CoopDetectorConfig(**kw))


@register_model
def coop_detector_tiny(**kw) -> CoopDetector:
    """The CPU check's detector: one block per stage, narrow channels, a 51.2 x 25.6 m grid."""
    base = dict(grid=BEVGrid((-25.6, 25.6), (-12.8, 12.8)), pillar_channels=16, channels=(16, 32, 64), blocks=(1, 1, 1),
                up_channels=32, head_channels=64)
    return CoopDetector(CoopDetectorConfig(**{**base, **kw}))
