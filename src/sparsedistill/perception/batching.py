"""Frames to the detector's inputs and targets: clouds in each ego frame, labels, teacher input, masks.

How agents' points reach the detector (``fusion`` of the model aside):
  intermediate  one cloud per agent, every one moved into the ego's frame (DSRC, B0, the no-fusion reference)
  early         one cloud per frame: every agent's points merged before pillarisation (the early-fusion reference)
The labels are the cars (the ego's own excepted) whose centre is inside the BEV grid and that at least
``min_points`` points of the fleet hit: a car no agent saw is no one's to find.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .anchors import AnchorConfig, assign_targets
from .dsrc import paint_teacher_input
from .frames import Frame
from .geometry import points_in_boxes
from .pillars import BEVGrid

__all__ = ["Batch", "FrameInputs", "collate", "frame_inputs", "frame_labels", "merge", "INPUTS"]

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

    def to(self, device: torch.device | str, pin: bool = False) -> "Batch":
        """The batch with every tensor on ``device`` (``pin``: page-locked host memory, for fast copies back to a GPU)."""
        def move(t):
            if isinstance(t, Tensor):  # asynchronous only host -> GPU (a GPU -> host copy must be complete here)
                t = t.to(device, non_blocking=torch.device(device).type == "cuda")
                return t.pin_memory() if pin and torch.cuda.is_available() else t
            return [move(x) for x in t] if isinstance(t, list) and t and isinstance(t[0], Tensor) else t

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


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


@dataclass
class FrameInputs:
    """One frame's share of a ``Batch`` (``frame_inputs``): a training loop that visits a frame many times keeps it
    and merges it again (``merge``), instead of re-collating (~400 small ops a frame, launch-bound on a GPU)."""

    clouds: list[Tensor]  # (N_c, 4) each, in the ego frame
    boxes: Tensor
    labels: Tensor | None = None  # (M,) int8
    positive_targets: Tensor | None = None  # (P, 7): the targets of the anchors labelled 1, in anchor order
    teacher_clouds: list[Tensor] | None = None
    objects: Tensor | None = None


def frame_inputs(frame: Frame, grid: BEVGrid, anchors: Tensor | None = None, anchor_cfg: AnchorConfig | None = None,
                 inputs: str = "intermediate", teacher: bool = False, min_points: int = 1) -> FrameInputs:
    """``frame``'s clouds, labels, anchor targets (with ``anchors``) and painted teacher input (with ``teacher``)."""
    if inputs not in INPUTS:
        raise ValueError(f"unknown input mode {inputs!r}; use one of {INPUTS}")
    if anchors is not None and anchor_cfg is None:
        raise ValueError("anchor targets need anchor_cfg beside the anchors")
    # contiguous: a kept (N, 4) view would hold the (N, 5) storage it was cut from
    own = [frame.points_in_ego(a)[:, :4].contiguous() for a in range(frame.num_agents)]
    gt = frame_labels(frame, own, grid, min_points)
    part = FrameInputs(own if inputs == "intermediate" else [torch.cat(own)], gt)
    if anchors is not None:
        labels, targets = assign_targets(anchors, gt, anchor_cfg)
        part.labels, part.positive_targets = labels.to(torch.int8), targets[labels == 1]
    if teacher:
        painted, part.objects = paint_teacher_input(own, gt)
        part.teacher_clouds = painted if inputs == "intermediate" else [torch.cat(painted)]
    return part


def _repeated(values: list[int], counts: list[int], device: torch.device) -> Tensor:
    """Each of ``values`` ``counts`` times, in order (the output size known on the host: no device sync)."""
    return torch.repeat_interleave(torch.tensor(values, device=device), torch.tensor(counts, device=device),
                                   output_size=sum(counts))


def merge(parts: list[FrameInputs]) -> Batch:
    """One ``Batch`` of frames' inputs, in order (clouds ordered by frame, the ego's first)."""
    if not parts:
        raise ValueError("a batch needs at least one frame")
    clouds = [c for p in parts for c in p.clouds]
    sizes, dev = [len(c) for c in clouds], clouds[0].device
    batch = Batch(torch.cat(clouds), _repeated(list(range(len(clouds))), sizes, dev), [len(p.clouds) for p in parts],
                  [p.boxes for p in parts],
                  merged_frame=_repeated([f for f, p in enumerate(parts) for _ in p.clouds], sizes, dev))
    if any(p.labels is not None for p in parts):
        if any(p.labels is None for p in parts):
            raise ValueError("merge got frames with and without anchor targets: give every frame_inputs the anchors")
        batch.labels = torch.cat([p.labels for p in parts]).long()
        batch.targets = torch.zeros(len(batch.labels), 7, device=batch.labels.device)
        batch.targets[batch.labels == 1] = torch.cat([p.positive_targets for p in parts])
    if any(p.teacher_clouds is not None for p in parts):
        if any(p.teacher_clouds is None for p in parts):
            raise ValueError("merge got frames with and without the teacher's input: collate them all with teacher=True")
        tclouds = [c for p in parts for c in p.teacher_clouds]
        batch.teacher_points = torch.cat(tclouds)
        batch.teacher_cloud = _repeated(list(range(len(tclouds))), [len(c) for c in tclouds], dev)
        batch.objects = torch.cat([p.objects for p in parts])
        batch.object_frame = _repeated(list(range(len(parts))), [len(p.objects) for p in parts], dev)
    return batch


def collate(frames: list[Frame], grid: BEVGrid, anchors: Tensor | None = None, anchor_cfg: AnchorConfig | None = None,
            inputs: str = "intermediate", teacher: bool = False, min_points: int = 1) -> Batch:
    """One batch of ``frames``; with ``anchors`` (M, 7) the anchor targets, with ``teacher`` DSRC's painted input too."""
    if inputs not in INPUTS:
        raise ValueError(f"unknown input mode {inputs!r}; use one of {INPUTS}")
    if not frames:
        raise ValueError("collate needs at least one frame")
    return merge([frame_inputs(f, grid, anchors, anchor_cfg, inputs, teacher, min_points) for f in frames])
