"""Fusing several agents' BEV features at each cell: DSRC / OpenCOOD's attention fusion, and the references.

Every agent's map is already in the ego's frame (points are moved there before pillarisation), so cell (i, j)
of every map is the same place. ``attention_fusion``: at each cell the agents' feature vectors attend to each
other (scaled dot products, softmax over agents, no learned weights) and the ego's row is kept; an agent
that saw nothing at a cell has a zero vector there and still takes part, as in the authors' code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_fusion", "FUSIONS"]


def attention_fusion(features: Tensor, agents: list[int]) -> Tensor:
    """(sum(agents), C, H, W) per-agent maps, frames in order with the ego first -> (frames, C, H, W)."""
    out = []
    for x in features.split(agents):
        c = x.shape[1]
        # the ego's query against every agent at each cell, as element-wise products summed over channels (a batched
        # matmul of 1 x C by C x A per cell ran one tiny product per cell on the CPU)
        att = torch.softmax((x[:1].float() * x.float()).sum(1, keepdim=True) / c**0.5, 0)  # (A, 1, H, W), fp32 sums
        out.append((att.to(x.dtype) * x).sum(0))
    return _stack(out, features)


def ego_only(features: Tensor, agents: list[int]) -> Tensor:
    """No fusion: each frame's ego map alone (the no-collaboration reference)."""
    return torch.cat([x[:1] for x in features.split(agents)])  # slices: no index tensor to copy to the device


def max_fusion(features: Tensor, agents: list[int]) -> Tensor:
    """Element-wise max over agents (a parameter-free reference, as OpenCOOD's max fusion)."""
    return _stack([x.amax(0) for x in features.split(agents)], features)


def _stack(maps: list[Tensor], like: Tensor) -> Tensor:
    """Per-frame maps (C, H, W) as (frames, C, H, W) in ``like``'s memory layout: NHWC maps stay NHWC (a plain
    stack would hand the next convolution NCHW, and cuDNN would transpose it back)."""
    if not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return torch.stack([m.permute(1, 2, 0) for m in maps]).permute(0, 3, 1, 2)
    return torch.stack(maps)


FUSIONS = {"attention": attention_fusion, "none": ego_only, "max": max_fusion}
