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
from .dsrc import object_mask, paint_teacher_input, reconstruction_targets
from .frames import Frame
from .geometry import points_in_boxes
from .pillars import BEVGrid

__all__ = ["Batch", "FrameInputs", "add_reconstruction_targets", "collate", "frame_inputs", "frame_labels", "merge",
           "INPUTS"]

INPUTS = ("intermediate", "early")


@dataclass
class Batch:
    points: Tensor  # (N, 4) in each frame's ego frame
    cloud: Tensor  # (N,) cloud index, clouds ordered by frame, the ego's first
    agents: list[int]  # clouds per frame
    boxes: list[Tensor] | None  # per frame, the labels (K, 7) in the ego frame (None: collated without labels)
    labels: Tensor | None = None  # (B * M,) anchor labels 1 / 0 / -1
    targets: Tensor | None = None  # (B * M, 7)
    teacher_points: Tensor | None = None  # (N', 5) painted, one cloud per agent (DSRC's teacher)
    teacher_cloud: Tensor | None = None
    object_mask: Tensor | None = None  # (B, H, W) 1 on the pillars of the fleet's points on cars (with the teacher's input)
    recon_occupancy: Tensor | None = None  # (B, 1, H, W): ``reconstruction_targets`` of all agents' points
    recon_offset: Tensor | None = None  # (B, 3, H, W)

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
    and merges it again (``merge``), instead of re-collating (~570 small ops a frame, launch-bound on a GPU).
    What depends on the frame alone is kept sparse, as indices into the frame's anchors or BEV cells, so that
    ``merge`` scatters it by index: no boolean selection, so no wait on the GPU, in a training step."""

    clouds: list[Tensor]  # (N_c, 4) each, in the ego frame
    boxes: Tensor | None  # the labels (K, 7); None: collated without them (not a frame without cars)
    labels: Tensor | None = None  # (M,) int8
    positive_index: Tensor | None = None  # (P,) the anchors labelled 1
    positive_targets: Tensor | None = None  # (P, 7) their targets
    teacher_clouds: list[Tensor] | None = None
    bev_shape: tuple[int, int] | None = None  # (H, W) of the grid the cells below index (row * W + col)
    object_cells: Tensor | None = None  # (C,) the object mask's cells
    occupied_cells: Tensor | None = None  # (R,) the cells all agents' points occupy
    occupied_offsets: Tensor | None = None  # (R, 3) their points' mean offsets (``reconstruction_targets``)


def frame_inputs(frame: Frame, grid: BEVGrid, anchors: Tensor | None = None, anchor_cfg: AnchorConfig | None = None,
                 inputs: str = "intermediate", teacher: bool = False, min_points: int = 1,
                 reconstruction: bool = False, labels: bool = True) -> FrameInputs:
    """``frame``'s clouds, labels (``labels=False``: none, as a detector in use has none to make), anchor targets (with
    ``anchors``), painted teacher input and object mask (with ``teacher``) and point-cloud reconstruction targets
    (with ``reconstruction``)."""
    if inputs not in INPUTS:
        raise ValueError(f"unknown input mode {inputs!r}; use one of {INPUTS}")
    if anchors is not None and anchor_cfg is None:
        raise ValueError("anchor targets need anchor_cfg beside the anchors")
    if not labels and (anchors is not None or teacher):
        raise ValueError("anchor targets and the teacher's painted input are made from the labels: keep labels=True")
    # contiguous: a kept (N, 4) view would hold the (N, 5) storage it was cut from
    own = [frame.points_in_ego(a)[:, :4].contiguous() for a in range(frame.num_agents)]
    gt = frame_labels(frame, own, grid, min_points) if labels else None
    part = FrameInputs(own if inputs == "intermediate" else [torch.cat(own)], gt)
    if anchors is not None:
        anchor_labels, targets = assign_targets(anchors, gt, anchor_cfg)
        part.labels, part.positive_index = anchor_labels.to(torch.int8), (anchor_labels == 1).nonzero()[:, 0]
        part.positive_targets = targets[part.positive_index]
    if teacher:
        painted, objects = paint_teacher_input(own, gt)
        part.teacher_clouds = painted if inputs == "intermediate" else [torch.cat(painted)]
        part.bev_shape = grid.shape
        part.object_cells = object_mask(objects, _frame_zero(objects), grid, 1).flatten().nonzero()[:, 0]
    return add_reconstruction_targets(part, grid) if reconstruction else part


def add_reconstruction_targets(part: FrameInputs, grid: BEVGrid) -> FrameInputs:
    """``part`` with the reconstruction targets of its frame's merged cloud (kept inputs gain them when a later job
    needs them, instead of being collated again)."""
    if part.bev_shape not in (None, grid.shape):
        raise ValueError(f"these inputs index a {part.bev_shape} grid, not this {grid.shape} one: collate them on one grid")
    if part.occupied_cells is None:
        merged = torch.cat(part.clouds)
        occupancy, offset = reconstruction_targets(merged, _frame_zero(merged), grid, 1)
        part.bev_shape = grid.shape
        part.occupied_cells = occupancy.flatten().nonzero()[:, 0]
        part.occupied_offsets = offset[0].flatten(1).T[part.occupied_cells]
    return part


def _frame_zero(points: Tensor) -> Tensor:
    """Frame index 0 for each of ``points``: the per-frame targets are made as a batch of one."""
    return torch.zeros(len(points), dtype=torch.long, device=points.device)


def _on_device(values: list[int], device: torch.device) -> Tensor:
    """A host list on ``device`` without waiting for the GPU (a plain copy to a GPU waits for its queue to drain)."""
    if device.type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


def _repeated(values: list[int], counts: list[int], device: torch.device) -> Tensor:
    """Each of ``values`` ``counts`` times, in order (the output size known on the host: no device sync)."""
    return torch.repeat_interleave(_on_device(values, device), _on_device(counts, device), output_size=sum(counts))


def _scattered(cells: list[Tensor], size: int, values: Tensor | float) -> Tensor:
    """Zeros (len(cells) * size, *values' row shape) with ``values`` (rows, or one number) at each part's ``cells``,
    offset by the part's place (no device sync)."""
    index = torch.cat([c + i * size for i, c in enumerate(cells)])
    if isinstance(values, Tensor):
        out = values.new_zeros(len(cells) * size, *values.shape[1:])
        return out.index_copy_(0, index, values)
    # index_fill_ takes the number as a kernel argument: a tensor made of it would be a copy that waits for the GPU
    return torch.zeros(len(cells) * size, device=index.device).index_fill_(0, index, values)


def merge(parts: list[FrameInputs], *, teacher: bool | None = None, reconstruction: bool | None = None) -> Batch:
    """One ``Batch`` of frames' inputs, in order (clouds ordered by frame, the ego's first). ``teacher`` /
    ``reconstruction``: True needs the parts' teacher input / reconstruction targets, False leaves them out of the
    batch (kept inputs may hold more than a job uses), None takes them where every part has them."""
    if not parts:
        raise ValueError("a batch needs at least one frame")
    clouds = [c for p in parts for c in p.clouds]
    sizes, dev = [len(c) for c in clouds], clouds[0].device
    labelled = _all_or_none(parts, "boxes", "labels", "collate them all with labels, or all without")
    batch = Batch(torch.cat(clouds), _repeated(list(range(len(clouds))), sizes, dev), [len(p.clouds) for p in parts],
                  [p.boxes for p in parts] if labelled else None)
    if _all_or_none(parts, "labels", "anchor targets", "give every frame_inputs the anchors"):
        batch.labels = torch.cat([p.labels for p in parts]).long()
        batch.targets = _scattered([p.positive_index for p in parts], len(parts[0].labels),
                                   torch.cat([p.positive_targets for p in parts]))
    if _wanted(parts, "teacher_clouds", teacher, "the teacher's input", "collate them all with teacher=True"):
        tclouds = [c for p in parts for c in p.teacher_clouds]
        batch.teacher_points = torch.cat(tclouds)
        batch.teacher_cloud = _repeated(list(range(len(tclouds))), [len(c) for c in tclouds], dev)
        h, w = _bev_shape(parts)
        batch.object_mask = _scattered([p.object_cells for p in parts], h * w, 1.0).view(len(parts), h, w)
    if _wanted(parts, "occupied_cells", reconstruction, "reconstruction targets", "collate them all with reconstruction=True"):
        h, w = _bev_shape(parts)
        cells = [p.occupied_cells for p in parts]
        batch.recon_occupancy = _scattered(cells, h * w, 1.0).view(len(parts), 1, h, w)
        batch.recon_offset = (_scattered(cells, h * w, torch.cat([p.occupied_offsets for p in parts]))
                              .view(len(parts), h, w, 3).permute(0, 3, 1, 2).contiguous())
    return batch


def _all_or_none(parts: list[FrameInputs], field: str, what: str, hint: str) -> bool:
    """Whether every part has ``field``; an error when some do and some do not."""
    has = [getattr(p, field) is not None for p in parts]
    if any(has) and not all(has):
        raise ValueError(f"merge got frames with and without {what}: {hint}")
    return all(has)


def _wanted(parts: list[FrameInputs], field: str, asked: bool | None, what: str, hint: str) -> bool:
    """Whether the batch gets ``field`` (see ``merge``'s ``teacher`` / ``reconstruction``)."""
    if asked is False:
        return False
    has = _all_or_none(parts, field, what, hint)
    if asked and not has:
        raise ValueError(f"merge was asked for {what}, which the frames lack: {hint}")
    return has


def _bev_shape(parts: list[FrameInputs]) -> tuple[int, int]:
    shapes = {p.bev_shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"merge got frames whose BEV cells index different grids {sorted(shapes)}: collate them on one")
    return shapes.pop()


def collate(frames: list[Frame], grid: BEVGrid, anchors: Tensor | None = None, anchor_cfg: AnchorConfig | None = None,
            inputs: str = "intermediate", teacher: bool = False, min_points: int = 1,
            reconstruction: bool = False, labels: bool = True) -> Batch:
    """One batch of ``frames``; with ``anchors`` (M, 7) the anchor targets, with ``teacher`` DSRC's painted input and
    object mask, with ``reconstruction`` the point-cloud reconstruction targets; ``labels=False``: the detector's
    input alone (``boxes`` None), as in use."""
    if inputs not in INPUTS:
        raise ValueError(f"unknown input mode {inputs!r}; use one of {INPUTS}")
    if not frames:
        raise ValueError("collate needs at least one frame")
    return merge([frame_inputs(f, grid, anchors, anchor_cfg, inputs, teacher, min_points, reconstruction, labels)
                  for f in frames])
