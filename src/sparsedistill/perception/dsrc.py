"""DSRC's training signals on tensors: the painted teacher input, the object mask, the distillation losses, and
the point-cloud reconstruction targets and loss (docs/notes/dsrc-reading.md, sections 2-3).

*Sparse-to-dense distillation.* The teacher sees, for each agent, its own points outside the cars plus the
points of **all** agents that fall inside the cars, with a 5th channel = 1 on those: every car is as densely
covered as the whole fleet sees it. The cells holding such points form the object mask M. The student (real,
sparse input) learns to match the teacher's features inside M at each scale before fusion and after fusion,
and the teacher's head outputs.

Where we depart from the authors' code, to do better (each said in docs/notes/dsrc.md):
- "inside a car" is the rotated box test (theirs: the axis-aligned bounds of the rotated corners, loose for
  turned cars);
- the masked MSE is averaged over the masked cells (theirs: over every element, so its scale follows how
  much of the map is car);
- the head term is a per-anchor Bernoulli KL on the classification logits (the head is sigmoid / focal) plus a
  smooth-L1 to the teacher's box deltas weighted by the teacher's confidence (theirs: a softmax across the 2
  anchor logits and across the 14 box-code channels);
- the teacher is frozen in eval mode (theirs keeps BatchNorm in train mode, so its statistics drift);
- reconstruction is per pillar in 2D (theirs predicts 10 depth slices of which only the first has targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import points_in_boxes
from .pillars import BEVGrid, scatter_pillars

__all__ = ["paint_teacher_input", "object_mask", "masked_feature_mse", "head_distillation", "reconstruction_targets",
           "reconstruction_loss"]


def paint_teacher_input(agent_points: list[Tensor], boxes: Tensor, margin: float = 0.1) -> tuple[list[Tensor], Tensor]:
    """For one frame's agents' points (each (N_a, 4), already in the ego frame) and its cars ``boxes`` (K, 7):
    the teacher's clouds (N'_a, 5), one per agent, and the fleet's object points (M, 5) (all painted 1)."""
    if any(p.ndim != 2 or p.shape[1] != 4 for p in agent_points):
        raise ValueError("paint_teacher_input takes each agent's points as (N, 4) = (x, y, z, intensity) in the ego frame")
    merged = torch.cat(agent_points) if agent_points else torch.zeros(0, 4)
    on_car = points_in_boxes(merged, boxes, margin) >= 0  # once for every point; split back per agent below
    objects = torch.cat([merged[on_car], torch.ones(int(on_car.sum()), 1, device=merged.device)], 1)
    clouds = []
    for p, car in zip(agent_points, on_car.split([len(p) for p in agent_points])):
        background = p[~car]
        clouds.append(torch.cat([torch.cat([background, torch.zeros(len(background), 1, device=p.device)], 1), objects]))
    return clouds, objects


def object_mask(objects: Tensor, frame: Tensor, grid: BEVGrid, num_frames: int) -> Tensor:
    """(num_frames, H, W) 1 where a pillar holds object points of that frame (``frame`` (M,) its index per point)."""
    h, w = grid.shape
    _, cell, _ = scatter_pillars(objects, frame, grid, num_frames)
    mask = torch.zeros(num_frames * h * w, device=objects.device)
    mask[cell] = 1.0
    return mask.view(num_frames, h, w)


def masked_feature_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean squared feature error over the masked cells: ``student``/``teacher`` (N, C, h, w), ``mask`` (N, H, W) averaged
    down to (h, w) (a coarse cell weighs by its share of car; DSRC resizes bilinearly, which skips cells). Zero when
    no cell is masked."""
    m = F.interpolate(mask[:, None], size=student.shape[-2:], mode="area")  # the share of each coarse cell that is car
    return (m * (student - teacher.detach()).square()).sum() / (m.sum() * student.shape[1]).clamp(min=1e-6)


def head_distillation(student_cls: Tensor, student_reg: Tensor, teacher_cls: Tensor, teacher_reg: Tensor) -> Tensor:
    """Per-anchor Bernoulli KL(teacher || student) on the logits (B, A, H, W), plus smooth-L1 of the box deltas (B, 7A, H, W)
    weighted by the teacher's confidence per anchor; both averaged over anchors."""
    t = torch.sigmoid(teacher_cls.detach())
    log_s, log_1s = F.logsigmoid(student_cls), F.logsigmoid(-student_cls)
    eps = 1e-6
    kl = t * (torch.log(t + eps) - log_s) + (1 - t) * (torch.log(1 - t + eps) - log_1s)
    b, a, h, w = student_cls.shape
    reg_err = F.smooth_l1_loss(student_reg.view(b, a, 7, h, w), teacher_reg.detach().view(b, a, 7, h, w), beta=1 / 9,
                               reduction="none").sum(2)
    return kl.mean() + (t * reg_err).sum() / t.sum().clamp(min=1.0)


def reconstruction_targets(points: Tensor, frame: Tensor, grid: BEVGrid, num_frames: int) -> tuple[Tensor, Tensor]:
    """What the fused map should tell about the merged cloud of all agents: occupancy (B, 1, H, W) per pillar and the
    offset (B, 3, H, W) of its points' mean from the pillar's centre (x, y in pillars, z in the grid's height)."""
    h, w = grid.shape
    pts, cell, deco = scatter_pillars(points, frame, grid, num_frames)
    n = num_frames * h * w
    count = torch.zeros(n, device=points.device).index_add_(0, cell, torch.ones(len(cell), device=points.device))
    # mean offset from the centre = mean of (point - centre); deco[:, 3:] is that for x, y
    zc = (grid.z_range[0] + grid.z_range[1]) / 2
    rel = torch.cat([deco[:, 3:] / grid.pillar, (pts[:, 2:3] - zc) / (grid.z_range[1] - grid.z_range[0])], 1)
    total = torch.zeros(n, 3, device=points.device).index_add_(0, cell, rel.float())
    occupied = count > 0
    offset = torch.where(occupied[:, None], total / count.clamp(min=1)[:, None], torch.zeros_like(total))
    return (occupied.float().view(num_frames, 1, h, w),
            offset.view(num_frames, h, w, 3).permute(0, 3, 1, 2).contiguous())


def reconstruction_loss(pred: Tensor, occupancy: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """(occupancy BCE with pos_weight = negatives / positives, L1 of the offsets on occupied pillars) for ``pred`` (B, 4, H, W)."""
    pos = occupancy.sum()
    pos_weight = ((occupancy.numel() - pos) / pos.clamp(min=1)).detach()
    occ = F.binary_cross_entropy_with_logits(pred[:, :1], occupancy, pos_weight=pos_weight)
    l1 = (occupancy * (pred[:, 1:] - offset).abs()).sum() / (3 * pos.clamp(min=1))
    return occ, l1
