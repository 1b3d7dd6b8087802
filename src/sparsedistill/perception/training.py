"""The cooperative detector's losses and predictions on a ``Batch``: what every DSRC recipe variant shares.

``detector_loss``: the detection loss alone (B0, the references, the teacher on its painted input).
``student_loss``: a model's whole training loss on a batch (the forwards included), what every variant trains on.
``dsrc_loss``: DSRC's student objective, detection + sparse-to-dense distillation (masked feature MSE at each
scale before fusion and after it, head distillation) + point-cloud reconstruction, each switchable so that
the ablations are the same code with a term off. ``predict``: boxes and scores per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .anchors import AnchorConfig, detection_loss, postprocess
from .batching import Batch
from .dsrc import head_distillation, masked_feature_mse, reconstruction_loss

__all__ = ["DSRCWeights", "flat_outputs", "detector_loss", "dsrc_loss", "student_loss", "teacher_points", "predict",
           "freeze"]


@dataclass(frozen=True)
class DSRCWeights:
    """Weights of DSRC's terms (the authors' code: all 1); 0 switches a term off (the ablations)."""

    before_fusion: float = 1.0
    after_fusion: float = 1.0
    head: float = 1.0
    occupancy: float = 1.0
    offset: float = 1.0


def flat_outputs(out: dict) -> tuple[Tensor, Tensor]:
    """(B * H' * W' * A,) logits and (same, 7) box deltas, in ``make_anchors(...).view(-1, 7)``'s order per frame."""
    cls, reg = out["cls"], out["reg"]
    b, a, h, w = cls.shape
    return cls.permute(0, 2, 3, 1).reshape(-1), reg.view(b, a, 7, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 7)


def detector_loss(out: dict, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    if batch.labels is None:
        raise ValueError("the batch has no anchor targets: collate it with anchors and anchor_cfg")
    return detection_loss(*flat_outputs(out), batch.labels, batch.targets)


def dsrc_loss(student_out: dict, teacher_out: dict | None, batch: Batch, weights: DSRCWeights = DSRCWeights()
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Detection + distillation (from ``teacher_out``, the frozen teacher's outputs on ``batch.teacher_points``) +
    reconstruction (``student_out['recon']``), as weighted by ``weights``."""
    loss, parts = detector_loss(student_out, batch)
    distill = teacher_out is not None and (weights.before_fusion or weights.after_fusion or weights.head)
    if distill:
        if batch.object_mask is None:
            raise ValueError("distillation needs the painted teacher input and its object mask: collate with teacher=True")
        mask = batch.object_mask  # (B, H, W)
        per_cloud = torch.cat([m.expand(n, -1, -1) for m, n in zip(mask, batch.agents)])  # the same cars for every agent
        before = sum(masked_feature_mse(s, t, per_cloud)
                     for s, t in zip(student_out["agent_features"], teacher_out["agent_features"]))
        after = masked_feature_mse(student_out["bev"], teacher_out["bev"], mask)
        head = head_distillation(student_out["cls"], student_out["reg"], teacher_out["cls"], teacher_out["reg"])
        loss = loss + weights.before_fusion * before + weights.after_fusion * after + weights.head * head
        parts.update(before_fusion=before.detach(), after_fusion=after.detach(), head=head.detach())
    if "recon" in student_out and (weights.occupancy or weights.offset):
        if batch.recon_occupancy is None:
            raise ValueError("reconstruction needs its targets in the batch: collate with reconstruction=True")
        occ, off = reconstruction_loss(student_out["recon"], batch.recon_occupancy, batch.recon_offset)
        loss = loss + weights.occupancy * occ + weights.offset * off
        parts.update(occupancy=occ.detach(), offset=off.detach())
    return loss, parts


def teacher_points(batch: Batch, painted: bool = True) -> Tensor:
    """The teacher's input points (N', 5) of ``batch``; ``painted=False``: the 5th channel zeroed (the no-painting
    ablation's teacher sees the same points without the mark of which lie on cars)."""
    if batch.teacher_points is None:
        raise ValueError("the batch has no teacher input: collate it with teacher=True")
    pts = batch.teacher_points
    return pts if painted else torch.cat([pts[:, :4], torch.zeros_like(pts[:, 4:])], 1)


def student_loss(model: nn.Module, batch: Batch, teacher: nn.Module | None = None, weights: DSRCWeights = DSRCWeights(),
                 painted: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """``model``'s training loss on ``batch``: the detection loss alone for a model without teacher or reconstruction
    head (B0, the references), else ``dsrc_loss`` with the frozen ``teacher``'s outputs on ``teacher_points``."""
    out = model(batch.points, batch.cloud, batch.agents)
    if teacher is None and "recon" not in out:
        return detector_loss(out, batch)
    t_out = None
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(teacher_points(batch, painted), batch.teacher_cloud, batch.agents)
    return dsrc_loss(out, t_out, batch, weights)


@torch.no_grad()
def predict(model: nn.Module, batch: Batch, anchors: Tensor, cfg: AnchorConfig,
            points: Tensor | None = None, cloud: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """(boxes (D, 7), scores (D,)) per frame of ``batch`` (``points``/``cloud`` override the batch's, e.g. painted ones)."""
    out = model(batch.points if points is None else points, batch.cloud if cloud is None else cloud, batch.agents)
    cls, reg = flat_outputs(out)
    m = len(anchors)
    return [postprocess(cls[i * m : (i + 1) * m], reg[i * m : (i + 1) * m], anchors, cfg) for i in range(batch.num_frames)]


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode (BatchNorm's statistics stay put, unlike the authors' code) and no gradients."""
    return model.eval().requires_grad_(False)
