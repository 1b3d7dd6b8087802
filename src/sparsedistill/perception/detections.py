"""A detector's evaluation on many frames, kept small enough for git: per-frame boxes packed into a few tensors, and
the predictions matched to the true boxes (float32 scores, a true-positive bit per IoU threshold, counts per frame)
as one .npz, from which AP and the paired bootstrap are rebuilt exactly (``FrameMatches.from_frames``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..runs import atomic_open
from .metrics import FrameMatches

__all__ = ["IOU_THRESHOLDS", "pack_frames", "unpack_frames", "save_matches", "load_matches", "packed_sha256"]

IOU_THRESHOLDS = {"ap50": 0.5, "ap70": 0.7}  # the AP thresholds, in the order of the matches' bits


def pack_frames(boxes: list[Tensor], scores: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-frame tensors as one tensor and the frames' counts: a few tensors a condition, not two a frame."""
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
    return torch.cat(boxes) if boxes else torch.zeros(0, 5), None if scores is None else torch.cat(scores), counts


def unpack_frames(boxes: Tensor, scores: Tensor | None, counts: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
    """``pack_frames``' inverse: the per-frame tensors."""
    sizes = counts.tolist()
    return list(boxes.split(sizes)), None if scores is None else list(scores.split(sizes))


def save_matches(path: Path, matches: dict[str, dict[str, FrameMatches]]) -> None:
    """Per condition: the predictions' float32 scores in frame order, a bit per AP threshold (bit i: a true
    positive at the i-th of IOU_THRESHOLDS), the predictions per frame; and the ground truths per frame."""
    arrays: dict[str, np.ndarray] = {}
    for key, by_t in matches.items():
        first = next(iter(by_t.values()))
        scores, _, counts = first.by_frame()
        if not torch.equal(scores.float().double(), scores.double()):  # float32 keeps every tie and order as it is
            raise ValueError(f"{key}: scores finer than float32 cannot be stored exactly; give float32 scores")
        flags = torch.zeros(len(scores), dtype=torch.uint8)
        for bit, t in enumerate(IOU_THRESHOLDS):
            s_t, tp, _ = by_t[t].by_frame()
            if not torch.equal(s_t, scores):  # one ranking, whatever the threshold
                raise AssertionError(f"{key}: the {t} matches rank the predictions differently")
            flags |= tp.cpu().to(torch.uint8) << bit
        arrays[f"{key}/scores"] = scores.float().cpu().numpy()
        arrays[f"{key}/flags"] = flags.numpy()
        arrays[f"{key}/counts"] = counts.int().cpu().numpy()
    arrays["num_gt"] = first.num_gt.int().cpu().numpy()  # the same frames in every condition
    with atomic_open(path) as f:
        np.savez_compressed(f, **arrays)


def load_matches(path: Path) -> dict[str, dict[str, FrameMatches]]:
    """``save_matches``' file as matches by condition and AP threshold."""
    with np.load(path) as z:
        num_gt = torch.from_numpy(z["num_gt"])
        keys = sorted({k.rsplit("/", 1)[0] for k in z.files if "/" in k})
        out = {}
        for key in keys:
            scores, flags = torch.from_numpy(z[f"{key}/scores"]), torch.from_numpy(z[f"{key}/flags"])
            counts = torch.from_numpy(z[f"{key}/counts"])
            out[key] = {t: FrameMatches.from_frames(scores, (flags >> bit) & 1, counts, num_gt)
                        for bit, t in enumerate(IOU_THRESHOLDS)}
        return out


def packed_sha256(packed: tuple[Tensor, Tensor | None, Tensor]) -> str:
    """A fingerprint of packed tensors (detect jobs of one run must have seen the same true boxes)."""
    h = hashlib.sha256()
    for t in packed:
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
