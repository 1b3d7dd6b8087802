"""Frames and boxes: moving points and 3D boxes between sensor poses, and which points a box holds.

A pose is (x, y, z, yaw) of a sensor in the world (z up, yaw about z); a box (x, y, z, l, w, h, yaw).
Rotations are about z only, as for cars on a flat road (what the simulator makes).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rotate_z", "points_to_world", "points_between", "boxes_between", "points_in_boxes"]


def rotate_z(xy: Tensor, yaw: Tensor | float) -> Tensor:
    """(..., 2) rotated counter-clockwise by ``yaw`` (a scalar or broadcastable to xy[..., 0])."""
    yaw = torch.as_tensor(yaw, dtype=xy.dtype, device=xy.device)
    c, s = yaw.cos(), yaw.sin()
    return torch.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], -1)


def points_to_world(points: Tensor, pose: Tensor) -> Tensor:
    """Points (N, >= 3) from the sensor at ``pose`` into the world; extra columns are kept."""
    xy = rotate_z(points[:, :2], pose[3]) + pose[:2]
    return torch.cat([xy, points[:, 2:3] + pose[2], points[:, 3:]], 1)


def points_between(points: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Points (N, >= 3) seen from pose ``src`` expressed in the frame of pose ``dst`` (e.g. a collaborator's to the ego's)."""
    world = points_to_world(points, src)
    xy = rotate_z(world[:, :2] - dst[:2], -dst[3])
    return torch.cat([xy, world[:, 2:3] - dst[2], world[:, 3:]], 1)


def boxes_between(boxes: Tensor, src: Tensor | None, dst: Tensor) -> Tensor:
    """Boxes (K, 7) in pose ``src``'s frame (None: the world) expressed in pose ``dst``'s frame."""
    if src is not None:
        boxes = torch.cat([rotate_z(boxes[:, :2], src[3]) + src[:2], boxes[:, 2:3] + src[2], boxes[:, 3:6],
                           boxes[:, 6:7] + src[3]], 1)
    xy = rotate_z(boxes[:, :2] - dst[:2], -dst[3])
    yaw = torch.atan2(torch.sin(boxes[:, 6] - dst[3]), torch.cos(boxes[:, 6] - dst[3]))  # wrapped to (-pi, pi]
    return torch.cat([xy, boxes[:, 2:3] - dst[2], boxes[:, 3:6], yaw[:, None]], 1)


def points_in_boxes(points: Tensor, boxes: Tensor, margin: float = 0.0) -> Tensor:
    """(N,) index of the box (K, 7) holding each point (N, >= 3), -1 for none (the first box where boxes overlap).

    ``margin`` grows every box by that many metres on each side (labels drawn tight miss a point on the surface).
    """
    if len(boxes) == 0 or len(points) == 0:
        return torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    rel = points[:, None, :3] - boxes[None, :, :3]  # (N, K, 3)
    local = rotate_z(rel[..., :2], -boxes[None, :, 6])
    half = boxes[None, :, 3:6] / 2 + margin
    inside = (local.abs() <= half[..., :2]).all(-1) & (rel[..., 2].abs() <= half[..., 2])
    first = torch.where(inside.any(1), inside.float().argmax(1), torch.full_like(inside[:, 0], -1, dtype=torch.long))
    return first
