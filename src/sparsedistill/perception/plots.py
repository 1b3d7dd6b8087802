"""Bird's-eye-view pictures of cooperative frames: each agent's points, the true cars and the detections."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .metrics import bev_corners
from .pillars import BEVGrid

__all__ = ["save_bev"]

AGENT_COLOURS = ["#222222", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]


def save_bev(path: Path, clouds: list[Tensor], truth: Tensor, grid: BEVGrid, detections: Tensor | None = None,
             scores: Tensor | None = None, title: str = "", min_score: float = 0.3) -> Path:
    """A PNG of ``clouds`` (per agent, (N, >= 2) in the ego frame; the ego first), the true boxes ``truth`` (K, 7) in green
    and ``detections`` (D, 7) with score >= ``min_score`` in red; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x0, x1), (y0, y1) = grid.x_range, grid.y_range
    fig, ax = plt.subplots(figsize=(12, 12 * (y1 - y0) / (x1 - x0) + 0.6))
    for i, p in enumerate(clouds):
        p = p.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=0.15, c=AGENT_COLOURS[i % len(AGENT_COLOURS)], linewidths=0,
                   label="ego" if i == 0 else f"agent {i}")
    for boxes, colour, keep in ((truth, "#00aa00", None), (detections, "#dd0000", scores)):
        if boxes is None or len(boxes) == 0:
            continue
        boxes = boxes.detach().cpu()
        if keep is not None:
            boxes = boxes[keep.detach().cpu() >= min_score]
        for c in bev_corners(boxes[:, [0, 1, 3, 4, 6]]):
            c = torch.cat([c, c[:1]])
            ax.plot(c[:, 0], c[:, 1], c=colour, lw=1.0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_title(title + "   (green: cars; red: detections)", fontsize=10)
    ax.legend(loc="upper right", markerscale=20, fontsize=8)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
