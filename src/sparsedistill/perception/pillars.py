"""Point clouds to bird's-eye-view pillar features (PointPillars), in plain PyTorch.

The BEV grid covers ``x_range`` x ``y_range`` (metres, in the ego's sensor frame) in square pillars of
``pillar`` metres. Pillars are *dynamic*: every point is kept (no 32-point cap, no fixed pillar budget) and
its features are pooled into its cell with a scatter-max, so no spconv voxeliser is needed and the result
does not depend on which points a cap would drop. Per point the encoder sees its raw values, its offset
to the mean of its pillar's points and its offset to the pillar's centre (PointPillars' 9 inputs with
intensity; one more with DSRC's painted channel), then Linear -> BatchNorm -> ReLU, max over the pillar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["BEVGrid", "PillarEncoder", "scatter_pillars"]


@dataclass(frozen=True)
class BEVGrid:
    x_range: tuple[float, float] = (-64.0, 64.0)
    y_range: tuple[float, float] = (-32.0, 32.0)
    z_range: tuple[float, float] = (-3.0, 1.0)  # relative to the ego's sensor (about 2 m above the road)
    pillar: float = 0.4

    def __post_init__(self) -> None:
        for lo, hi in (self.x_range, self.y_range, self.z_range):
            if not lo < hi:
                raise ValueError(f"grid ranges must be (low, high) with low < high, got {self}")
        for lo, hi in (self.x_range, self.y_range):
            if abs(round((hi - lo) / self.pillar) * self.pillar - (hi - lo)) > 1e-6 or round((hi - lo) / self.pillar) % 8:
                raise ValueError(f"each BEV side must be a multiple of 8 pillars of {self.pillar} m (the backbone halves it "
                                 f"three times), got x {self.x_range}, y {self.y_range}")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) = (cells along y, cells along x)."""
        return (round((self.y_range[1] - self.y_range[0]) / self.pillar), round((self.x_range[1] - self.x_range[0]) / self.pillar))

    def inside(self, points: Tensor) -> Tensor:
        x, y, z = points[:, 0], points[:, 1], points[:, 2]
        return ((x >= self.x_range[0]) & (x < self.x_range[1]) & (y >= self.y_range[0]) & (y < self.y_range[1])
                & (z >= self.z_range[0]) & (z < self.z_range[1]))


def scatter_pillars(points: Tensor, batch: Tensor, grid: BEVGrid, num_clouds: int) -> tuple[Tensor, Tensor, Tensor]:
    """Points (N, F) of ``batch`` (N,) clouds inside the grid: (kept points, their flat cell index
    ``b * H * W + row * W + col``, per-point decorations (N', 5): offsets to the pillar mean (3) and centre (2))."""
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"expected points (N, >= 3), got {tuple(points.shape)}")
    if batch.dtype != torch.long or batch.shape != points.shape[:1]:
        raise ValueError(f"the cloud indices must be one integer index per point (N,) = ({len(points)},), got "
                         f"{batch.dtype} {tuple(batch.shape)}")
    keep = grid.inside(points)
    # the checks and the selection's size in one read from the device (each read waits for the GPU's queue), and the
    # kept points' indices by a stable sort (a boolean selection would wait for the device again)
    kept, nonfinite, stray = torch.stack([keep.sum(), (~torch.isfinite(points[:, :3])).sum(),
                                          ((batch < 0) | (batch >= num_clouds)).sum()]).tolist()
    if nonfinite:
        raise ValueError("points hold NaN or infinite coordinates: drop them before pillarising")
    if stray:
        raise ValueError(f"{stray} points have a cloud index outside 0..{num_clouds - 1}: give each point its cloud's "
                         f"index, and count every cloud (a detector's: the agents per frame, summed)")
    if kept < len(points):
        index = torch.argsort(keep.to(torch.uint8), descending=True, stable=True)[:kept]
        points, batch = points[index], batch[index]
    h, w = grid.shape
    col = ((points[:, 0] - grid.x_range[0]) / grid.pillar).long().clamp(0, w - 1)
    row = ((points[:, 1] - grid.y_range[0]) / grid.pillar).long().clamp(0, h - 1)
    cell = batch * (h * w) + row * w + col
    total = num_clouds * h * w
    count = torch.zeros(total, device=points.device).index_add_(0, cell, torch.ones_like(cell, dtype=torch.float32))
    mean = torch.zeros(total, 3, device=points.device).index_add_(0, cell, points[:, :3].float())
    mean = mean[cell] / count[cell, None]
    centre = torch.stack([(col.float() + 0.5) * grid.pillar + grid.x_range[0],
                          (row.float() + 0.5) * grid.pillar + grid.y_range[0]], 1)
    deco = torch.cat([points[:, :3] - mean, points[:, :2] - centre], 1)
    return points, cell, deco


class PillarEncoder(nn.Module):
    """Points -> (B, C, H, W) BEV features; ``in_features`` raw values per point (4: x, y, z, intensity; 5 painted)."""

    def __init__(self, grid: BEVGrid, in_features: int = 4, channels: int = 64, channels_last: bool = False) -> None:
        super().__init__()
        self.grid, self.in_features, self.channels = grid, in_features, channels
        # the scatter fills (clouds, H, W, C): handed on as it is (NHWC, no copy) or copied to NCHW
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.linear = nn.Linear(in_features + 5, channels, bias=False)
        self.norm = nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)

    def forward(self, points: Tensor, batch: Tensor, num_clouds: int) -> Tensor:
        if points.shape[1] != self.in_features:
            raise ValueError(f"this encoder takes {self.in_features} values per point, got {points.shape[1]}")
        pts, cell, deco = scatter_pillars(points, batch, self.grid, num_clouds)
        h, w = self.grid.shape
        out = torch.zeros(num_clouds * h * w, self.channels, device=points.device, dtype=self.linear.weight.dtype)
        if len(pts):
            x = self.linear(torch.cat([pts, deco], 1).to(self.linear.weight.dtype))
            if self.training and len(x) < 2:  # batch statistics need two points: use the running ones
                x = nn.functional.batch_norm(x, self.norm.running_mean, self.norm.running_var, self.norm.weight,
                                             self.norm.bias, False, 0.0, self.norm.eps)
            else:
                x = self.norm(x)
            feats = torch.relu(x).to(out.dtype)  # under autocast the features come out in bf16
            # features are >= 0 after the ReLU, so a max into zeros is the max over the pillar's points (empty: 0)
            out = out.scatter_reduce(0, cell[:, None].expand(-1, self.channels), feats, reduce="amax", include_self=True)
        return out.view(num_clouds, h, w, self.channels).permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
