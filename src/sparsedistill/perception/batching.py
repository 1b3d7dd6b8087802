"""Frames to the detector's inputs and targets: clouds in each ego frame, labels, teacher input, masks.

How agents' points reach the detector (``fusion`` of the model aside):
  intermediate  one cloud per agent, every one moved into the ego's frame (DSRC, B0, the no-fusion reference)
  early         one cloud per frame: every agent's points merged before pillarisation (the early-fusion reference)
The labels are the cars (the ego's own excepted) whose centre is inside the BEV grid and that at least
``min_points`` points of the fleet hit: a car no agent saw is no one's to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .anchors import AnchorConfig, assign_targets
from .dsrc import paint_teacher_input
from .frames import Frame
from .geometry import points_in_boxes
from .pillars import BEVGrid

__all__ = ["Batch", "collate", "frame_labels", "INPUTS"]

INPUTS = ("intermediate", "early")


@dataclass
class Batch:
    points: Tensor  # (N, 4) in each frame's ego frame
    cloud: Tensor  # (N,) cloud index, clouds ordered by frame, the ego's first
    agents: list[int]  # clouds per frame
    boxes: list[Tensor]  # per frame, the labels (K, 7) in the ego frame
    labels: Tensor | None = None  # (B * M,) anchor labels 1 / 0 / -1
    targets: Tensor | None = None  # (B * M, 7)
    teacher_points: Tensor | None = None  # (N', 5) painted, one cloud per agent (DSRC's teacher)
    teacher_cloud: Tensor | None = None
    objects: Tensor | None = None  # (M, 5) the fleet's points on cars, ``object_frame`` their frame
    object_frame: Tensor | None = None
    merged_frame: Tensor | None = None  # (N,) frame of each point of ``points`` (reconstruction targets)

    @property
    def num_frames(self) -> int:
        return len(self.agents)


def frame_labels(frame: Frame, agent_points: list[Tensor], grid: BEVGrid, min_points: int = 1) -> Tensor:
    """The cars the fleet should find in ``frame``: (K, 7) in the ego frame (see the module docstring)."""
    boxes = frame.boxes_in_ego()
    inside = ((boxes[:, 0] >= grid.x_range[0]) & (boxes[:, 0] < grid.x_range[1])
              & (boxes[:, 1] >= grid.y_range[0]) & (boxes[:, 1] < grid.y_range[1]))
    boxes = boxes[inside]
    merged = torch.cat(agent_points)
    holder = points_in_boxes(merged, boxes, margin=0.1)
    hits = torch.bincount(holder[holder >= 0], minlength=len(boxes))
    return boxes[hits >= min_points]


def collate(frames: list[Frame], grid: BEVGrid, anchors: Tensor | None = None, anchor_cfg: AnchorConfig | None = None,
            inputs: str = "intermediate", teacher: bool = False, min_points: int = 1) -> Batch:
    """One batch of ``frames``; with ``anchors`` (M, 7) the anchor targets, with ``teacher`` DSRC's painted input too."""
    if inputs not in INPUTS:
        raise ValueError(f"unknown input mode {inputs!r}; use one of {INPUTS}")
    if not frames:
        raise ValueError("collate needs at least one frame")
    pts, clouds, agents, boxes, merged_frame = [], [], [], [], []
    tpts, tclouds, objs, obj_frame = [], [], [], []
    n_cloud = n_tcloud = 0
    for f, frame in enumerate(frames):
        own = [frame.points_in_ego(a)[:, :4] for a in range(frame.num_agents)]
        gt = frame_labels(frame, own, grid, min_points)
        boxes.append(gt)
        per_cloud = own if inputs == "intermediate" else [torch.cat(own)]
        for p in per_cloud:
            pts.append(p)
            clouds.append(torch.full((len(p),), n_cloud, dtype=torch.long, device=p.device))
            merged_frame.append(torch.full((len(p),), f, dtype=torch.long, device=p.device))
            n_cloud += 1
        agents.append(len(per_cloud))
        if teacher:
            painted, objects = paint_teacher_input(own, gt)
            for p in painted if inputs == "intermediate" else [torch.cat(painted)]:
                tpts.append(p)
                tclouds.append(torch.full((len(p),), n_tcloud, dtype=torch.long, device=p.device))
                n_tcloud += 1
            objs.append(objects)
            obj_frame.append(torch.full((len(objects),), f, dtype=torch.long, device=objects.device))
    batch = Batch(torch.cat(pts), torch.cat(clouds), agents, boxes, merged_frame=torch.cat(merged_frame))
    if anchors is not None:
        if anchor_cfg is None:
            raise ValueError("anchor targets need anchor_cfg beside the anchors")
        lt = [assign_targets(anchors, gt, anchor_cfg) for gt in boxes]
        batch.labels, batch.targets = torch.cat([x for x, _ in lt]), torch.cat([t for _, t in lt])
    if teacher:
        batch.teacher_points, batch.teacher_cloud = torch.cat(tpts), torch.cat(tclouds)
        batch.objects, batch.object_frame = torch.cat(objs), torch.cat(obj_frame)
    return batch
