"""The anchor head's geometry: anchors on the BEV output grid, box coding, target assignment, losses, decoding, NMS.

Two anchors per output cell (yaw 0 and 90 degrees) of one car size, as DSRC / OpenCOOD's PointPillars. An
anchor is positive for a car when their rotated BEV IoU is >= ``pos_iou``, negative below ``neg_iou``, and
each car also claims its best anchor; between the thresholds it is ignored. (OpenCOOD assigns with an
axis-aligned IoU of boxes grown by 1 m; a rotated IoU is what the evaluation uses, so targets agree with it.)
Regression targets are SECOND's: centre offsets over the anchor's diagonal / height, log size ratios and
the yaw difference, learned through the sine of the angle error (no direction classifier: a BEV box is the
same at yaw and yaw + pi). Classification is a focal loss (alpha 0.25, gamma 2), regression smooth-L1
(beta 1/9, weight 2), both normalised by the number of positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import rotated_iou_bev
from .pillars import BEVGrid

__all__ = ["AnchorConfig", "make_anchors", "encode", "decode", "assign_targets", "detection_loss", "nms_bev", "postprocess"]


@dataclass(frozen=True)
class AnchorConfig:
    size: tuple[float, float, float] = (4.5, 1.8, 1.6)  # l, w, h of a car (the simulator draws 3.8-5.2 x 1.65-2.0 x 1.4-1.8)
    z: float = -1.1  # centre height in the ego's sensor frame (~1.9 m above the road)
    yaws: tuple[float, ...] = (0.0, math.pi / 2)
    stride: int = 2  # output cells per pillar side
    pos_iou: float = 0.6
    neg_iou: float = 0.45
    score_threshold: float = 0.05  # low enough for a full precision-recall curve; DSRC draws at 0.25
    nms_iou: float = 0.15
    max_detections: int = 100


def make_anchors(grid: BEVGrid, cfg: AnchorConfig, device: torch.device | str = "cpu") -> Tensor:
    """(H', W', A, 7) anchors at the centres of the output cells."""
    h, w = grid.shape
    h, w = h // cfg.stride, w // cfg.stride
    step = grid.pillar * cfg.stride
    ys = grid.y_range[0] + (torch.arange(h, device=device) + 0.5) * step
    xs = grid.x_range[0] + (torch.arange(w, device=device) + 0.5) * step
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    n = len(cfg.yaws)
    out = torch.zeros(h, w, n, 7, device=device)
    out[..., 0], out[..., 1], out[..., 2] = x[..., None], y[..., None], cfg.z
    out[..., 3:6] = torch.tensor(cfg.size, device=device)
    out[..., 6] = torch.tensor(cfg.yaws, device=device)
    return out


def encode(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets (..., 7) of ``boxes`` relative to ``anchors`` (both (..., 7))."""
    diag = anchors[..., 3:5].norm(dim=-1)
    return torch.stack([(boxes[..., 0] - anchors[..., 0]) / diag, (boxes[..., 1] - anchors[..., 1]) / diag,
                        (boxes[..., 2] - anchors[..., 2]) / anchors[..., 5],
                        *(torch.log(boxes[..., i] / anchors[..., i]) for i in (3, 4, 5)),
                        boxes[..., 6] - anchors[..., 6]], -1)


def decode(deltas: Tensor, anchors: Tensor) -> Tensor:
    """Boxes (..., 7) from regression outputs; yaws wrapped to (-pi, pi]."""
    diag = anchors[..., 3:5].norm(dim=-1)
    yaw = anchors[..., 6] + deltas[..., 6]
    return torch.stack([anchors[..., 0] + deltas[..., 0] * diag, anchors[..., 1] + deltas[..., 1] * diag,
                        anchors[..., 2] + deltas[..., 2] * anchors[..., 5],
                        *(anchors[..., i] * torch.exp(deltas[..., i].clamp(max=4)) for i in (3, 4, 5)),
                        torch.atan2(yaw.sin(), yaw.cos())], -1)


def assign_targets(anchors: Tensor, gt: Tensor, cfg: AnchorConfig) -> tuple[Tensor, Tensor]:
    """For flat ``anchors`` (M, 7) and one frame's cars ``gt`` (K, 7): labels (M,) 1 / 0 / -1 (ignore) and
    regression targets (M, 7) (zeros where not positive)."""
    m = len(anchors)
    labels = torch.zeros(m, dtype=torch.long, device=anchors.device)
    targets = torch.zeros(m, 7, device=anchors.device)
    if len(gt) == 0:
        return labels, targets
    # only anchors near a car can overlap it: test those (the full M x K IoU would be mostly zeros)
    reach = (anchors[:, None, :2] - gt[None, :, :2]).norm(dim=-1) < (gt[None, :, 3] + anchors[:, None, 3]) / 2
    cand = reach.any(1).nonzero().squeeze(1)
    iou = torch.zeros(m, len(gt), device=anchors.device)
    if len(cand):
        iou[cand] = rotated_iou_bev(anchors[cand][:, [0, 1, 3, 4, 6]], gt[:, [0, 1, 3, 4, 6]])
    best_iou, best_gt = iou.max(1)
    labels[(best_iou >= cfg.neg_iou) & (best_iou < cfg.pos_iou)] = -1
    pos = best_iou >= cfg.pos_iou
    forced = iou.argmax(0)  # every car keeps its best anchor, even below pos_iou
    has = iou.max(0).values > 0
    pos[forced[has]] = True
    best_gt[forced[has]] = torch.arange(len(gt), device=anchors.device)[has]
    labels[pos] = 1
    targets[pos] = encode(gt[best_gt[pos]], anchors[pos])
    return labels, targets


def detection_loss(cls_logits: Tensor, reg: Tensor, labels: Tensor, targets: Tensor,
                   reg_weight: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Focal classification + smooth-L1 regression (sine of the yaw error) over flat anchors of a batch.

    ``cls_logits`` (N,), ``reg`` (N, 7), ``labels`` (N,) in {1, 0, -1}, ``targets`` (N, 7).
    """
    valid = labels >= 0
    pos = labels == 1
    norm = pos.sum().clamp(min=1).float()
    y = pos.float()
    p = torch.sigmoid(cls_logits)
    ce = F.binary_cross_entropy_with_logits(cls_logits, y, reduction="none")
    pt = torch.where(pos, p, 1 - p)
    alpha = torch.where(pos, 0.25, 0.75)
    cls = (alpha * (1 - pt) ** 2 * ce * valid).sum() / norm
    # the yaw error through its sine (SECOND): sin(a - b) = sin a cos b - cos a sin b, blind to the pi ambiguity;
    # over every anchor, masked to the positives (selecting them would wait for the device)
    r = torch.cat([reg[:, :6], (reg[:, 6].sin() * targets[:, 6].cos())[:, None]], 1)
    t = torch.cat([targets[:, :6], (reg[:, 6].cos() * targets[:, 6].sin())[:, None]], 1)
    box = torch.where(pos, F.smooth_l1_loss(r, t, beta=1 / 9, reduction="none").sum(1), 0.0).sum() / norm
    return cls + reg_weight * box, {"cls": cls.detach(), "box": box.detach()}


def nms_bev(boxes: Tensor, scores: Tensor, iou: float, limit: int) -> Tensor:
    """Indices kept by greedy non-maximum suppression on rotated BEV IoU, best first, at most ``limit``."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    if len(boxes) == 0:
        return order
    # one copy to the host, then the greedy loop there (candidates are few: score threshold + pre-NMS top-k)
    overlap = (rotated_iou_bev(boxes[:, [0, 1, 3, 4, 6]], boxes[:, [0, 1, 3, 4, 6]]) > iou).cpu()
    keep = torch.ones(len(boxes), dtype=torch.bool)
    for i in range(len(boxes)):
        if keep[i]:
            keep[i + 1 :] &= ~overlap[i, i + 1 :]
    return order[keep.nonzero().squeeze(1).to(order.device)][:limit]


def postprocess(cls_logits: Tensor, reg: Tensor, anchors: Tensor, cfg: AnchorConfig,
                pre_nms: int = 500) -> tuple[Tensor, Tensor]:
    """One frame's detections: boxes (D, 7) and scores (D,) from flat logits (M,), outputs (M, 7), anchors (M, 7)."""
    scores = torch.sigmoid(cls_logits)
    cand = (scores >= cfg.score_threshold).nonzero().squeeze(1)
    cand = cand[scores[cand].argsort(descending=True)[:pre_nms]]
    boxes = decode(reg[cand], anchors[cand])
    keep = nms_bev(boxes, scores[cand], cfg.nms_iou, cfg.max_detections)
    return boxes[keep], scores[cand][keep]
