"""Evaluation of LiDAR 3D car detectors in bird's-eye view (issue #23): rotated IoU, AP, robustness, paired bootstrap.

- ``rotated_iou_bev``: exact IoU of rotated rectangles. Each pair is moved into the first box's frame, where
  that box is axis-aligned, and the second box's quadrilateral is clipped by its four half-planes
  (Sutherland-Hodgman, batched over pairs), then measured by the shoelace formula;
- ``match_frames`` / ``average_precision``: one class, predictions ranked by score over all frames, each
  matched greedily to the best unmatched ground truth of its own frame, AP with the all-point
  interpolation (VOC 2010+, the convention of OpenCOOD's evaluation, which collaborative-perception
  papers report at IoU 0.5 and 0.7);
- Robo3D's corruption error (CE) and resilience rate (RR) and their means over corruptions;
- ``paired_bootstrap_delta_ap``: AP(A) - AP(B) on the same frames with a percentile interval, resampling
  frames (the greedy matching is per frame, so each frame's true-positive flags survive resampling and
  IoUs are computed once).

BEV boxes are rows (x, y, l, w, yaw): centre in metres, length along the heading, width, yaw in radians
counter-clockwise from +x. A 3D box (x, y, z, l, w, h, yaw) gives its BEV box as columns [0, 1, 3, 4, 6].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["bev_corners", "rotated_iou_bev", "FrameMatches", "match_frames", "average_precision", "matched_ap",
           "corruption_error", "resilience_rate", "mean_ce", "mean_rr", "paired_bootstrap_delta_ap",
           "paired_bootstrap_delta_matched", "paired_bootstrap_delta_seeds"]

Detections = tuple[Sequence[Tensor], Sequence[Tensor]]  # per frame: boxes (Pi, 5), scores (Pi,)


def _check_bev(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 5 or not boxes.is_floating_point():
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name}: expected float BEV boxes (N, 5) as (x, y, l, w, yaw), got {got}; "
                         "from 3D boxes (N, 7) take columns [0, 1, 3, 4, 6]")
    bad = ~torch.isfinite(boxes).all(1) | (boxes[:, 2:4] < 0).any(1)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"{name}: box {row} is {boxes[row].tolist()}; boxes must be finite with l, w >= 0")


def bev_corners(boxes: Tensor) -> Tensor:
    """(N, 4, 2) corners of BEV boxes (N, 5), counter-clockwise from the front-right one."""
    _check_bev(boxes, "boxes")
    return _corners(boxes)


def _corners(boxes: Tensor) -> Tensor:
    x, y, l, w, yaw = boxes.unbind(1)
    cos, sin = yaw.cos()[:, None], yaw.sin()[:, None]
    lx = boxes.new_tensor([0.5, 0.5, -0.5, -0.5]) * l[:, None]
    ly = boxes.new_tensor([-0.5, 0.5, 0.5, -0.5]) * w[:, None]
    return torch.stack((x[:, None] + cos * lx - sin * ly, y[:, None] + sin * lx + cos * ly), -1)


def _clip(poly: Tensor, dist: Tensor, tol: Tensor) -> Tensor:
    """One Sutherland-Hodgman step: polygons (K, V, 2) cut to {dist >= 0}, as (K, V + 1, 2).

    Vertices within ``tol`` of the line count as inside, so edges lying on it (touching or identical boxes)
    never flip in and out by rounding: a convex polygon then crosses the line at most twice and keeps at
    most V + 1 vertices. Unused slots repeat the last vertex (zero-length edges add no area).
    """
    k, v, _ = poly.shape
    inside = dist >= -tol
    nxt, dist_nxt = poly.roll(-1, 1), dist.roll(-1, 1)
    crosses = inside != inside.roll(-1, 1)
    # the crossing point of edge (vertex, next vertex); the clamp keeps it on the edge for vertices within tol
    t = torch.where(crosses, dist / torch.where(crosses, dist - dist_nxt, 1.0), 0.0).clamp(0, 1)
    cand = torch.stack((poly, poly + t[..., None] * (nxt - poly)), 2).flatten(1, 2)  # vertex, then its edge's crossing
    keep = torch.stack((inside, crosses), 2).flatten(1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept candidates first, in order
    last = keep.sum(1, keepdim=True).sub(1).clamp(min=0)
    slot = torch.minimum(torch.arange(v + 1, device=poly.device).expand(k, -1), last)
    return cand.gather(1, order.gather(1, slot)[..., None].expand(-1, -1, 2))


def _pair_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row-aligned pairs of BEV boxes (K, 5), in float64."""
    # b in a's frame, where a is the axis-aligned rectangle |x| <= l/2, |y| <= w/2
    cos, sin = a[:, 4].cos(), a[:, 4].sin()
    dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    rel = torch.stack((cos * dx + sin * dy, cos * dy - sin * dx, b[:, 2], b[:, 3], b[:, 4] - a[:, 4]), 1)
    poly = _corners(rel)
    half = a[:, 2:4, None] / 2  # (K, 2, 1)
    tol = 1e-9 * torch.maximum(a[:, 2:4].amax(1), b[:, 2:4].amax(1))[:, None]
    for axis in (0, 1):
        for sign in (1.0, -1.0):
            poly = _clip(poly, half[:, axis] - sign * poly[..., axis], tol)
    x, y = poly.unbind(-1)
    inter = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1)
    area_a, area_b = a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]
    inter = torch.minimum(inter.clamp(min=0), torch.minimum(area_a, area_b))
    return inter / (area_a + area_b - inter)


def rotated_iou_bev(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) exact IoU between BEV boxes a (N, 5) and b (M, 5); 0 where either box has zero area."""
    _check_bev(a, "a")
    _check_bev(b, "b")
    return _iou_matrix(a, b).to(a.dtype)


def _iou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Unchecked ``rotated_iou_bev``, in float64."""
    out = a.new_zeros(len(a), len(b), dtype=torch.float64)
    if out.numel() == 0:
        return out
    a64, b64 = a.double(), b.to(device=a.device, dtype=torch.float64)
    # only pairs whose circumscribed circles overlap, both of positive area, can intersect
    radius_a, radius_b = a64[:, 2:4].norm(dim=1) / 2, b64[:, 2:4].norm(dim=1) / 2
    near = (a64[:, None, :2] - b64[None, :, :2]).square().sum(-1) < (radius_a[:, None] + radius_b[None, :]).square()
    near &= ((a64[:, 2] * a64[:, 3]) > 0)[:, None] & ((b64[:, 2] * b64[:, 3]) > 0)[None, :]
    i, j = near.nonzero(as_tuple=True)
    if len(i):
        out[i, j] = _pair_iou(a64[i], b64[j])
    return out


@dataclass(frozen=True)
class FrameMatches:
    """Every prediction of a set of frames, ranked by score over all of them, and whether it is a true positive.

    The ranking is a stable descending sort: equal scores keep frame order, then their order within the frame.
    """

    scores: Tensor  # (P,) float64
    tp: Tensor  # (P,) bool
    frame: Tensor  # (P,) long: the frame each prediction belongs to
    num_gt: Tensor  # (F,) long: ground truths per frame

    @property
    def total_gt(self) -> int:
        return int(self.num_gt.sum())

    def by_frame(self) -> tuple[Tensor, Tensor, Tensor]:
        """(scores, tp, counts) in frame order, each frame's predictions by rank: what ``from_frames`` rebuilds
        the ranking from (a stable sort by frame undoes the stable sort by score), e.g. to store it compactly."""
        order = torch.sort(self.frame, stable=True).indices
        counts = torch.bincount(self.frame, minlength=len(self.num_gt))
        return self.scores[order], self.tp[order], counts

    @classmethod
    def from_frames(cls, scores: Tensor, tp: Tensor, counts: Tensor, num_gt: Tensor) -> "FrameMatches":
        """The inverse of ``by_frame``: the same ranking, ties included, as ``match_frames`` made it."""
        if not len(scores) == len(tp) == int(counts.sum()) or len(counts) != len(num_gt):
            raise ValueError(f"inconsistent matches: {len(scores)} scores, {len(tp)} flags, counts summing to "
                             f"{int(counts.sum())} over {len(counts)} frames, {len(num_gt)} ground-truth counts")
        scores, num_gt = scores.double(), num_gt.long()
        frame = torch.repeat_interleave(torch.arange(len(counts), device=scores.device), counts.long().to(scores.device))
        order = torch.sort(scores, descending=True, stable=True).indices
        return cls(scores[order], tp.bool()[order], frame[order], num_gt)


def match_frames(pred_boxes: Sequence[Tensor], pred_scores: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                 iou_threshold: float) -> FrameMatches:
    """Greedy matching per frame: by descending score, each prediction takes the unmatched ground truth of its
    frame with the highest BEV IoU if that IoU is >= ``iou_threshold`` (a true positive), else it is a false
    positive (so are duplicates of a matched object). Lists hold one entry per frame; any may be empty."""
    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise ValueError(f"give one entry per frame in each list: got {len(pred_boxes)} box sets, "
                         f"{len(pred_scores)} score sets and {len(gt_boxes)} ground-truth sets")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    for f, (boxes, scores, gts) in enumerate(zip(pred_boxes, pred_scores, gt_boxes)):
        _check_bev(boxes, f"pred_boxes[{f}]")
        _check_bev(gts, f"gt_boxes[{f}]")
        if not isinstance(scores, Tensor) or scores.shape != (len(boxes),):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"pred_scores[{f}]: expected one score per box, shape ({len(boxes)},), got {got}")
    device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
    frames = len(gt_boxes)
    n_pred = torch.tensor([len(b) for b in pred_boxes], dtype=torch.long, device=device)
    num_gt = torch.tensor([len(g) for g in gt_boxes], dtype=torch.long, device=device)
    p_max, g_max = max(map(len, pred_boxes), default=0), max(map(len, gt_boxes), default=0)
    # padded to (frames, rank, ground truth); padding has IoU -1 and never matches (the threshold is > 0)
    ious = torch.full((frames, p_max, g_max), -1.0, dtype=torch.float64, device=device)
    scores = torch.zeros(frames, p_max, dtype=torch.float64, device=device)  # exact for float32 and float64 scores
    for f, (boxes, s, gts) in enumerate(zip(pred_boxes, pred_scores, gt_boxes)):
        s, order = torch.sort(s.to(device), descending=True, stable=True)
        scores[f, : len(s)] = s
        ious[f, : len(s), : len(gts)] = _iou_matrix(boxes.to(device)[order], gts.to(device))
    tp = torch.zeros(frames, p_max, dtype=torch.bool, device=device)
    matched = torch.zeros(frames, g_max, dtype=torch.bool, device=device)
    rows = torch.arange(frames, device=device)
    # the choice at rank r depends on ranks < r: one step per rank, all frames at once
    for rank in range(p_max if g_max else 0):
        best, j = ious[:, rank].masked_fill(matched, -1.0).max(1)
        hit = best >= iou_threshold
        tp[:, rank] = hit
        matched[rows, j] |= hit
    valid = torch.arange(p_max, device=device) < n_pred[:, None]
    flat_scores = scores[valid]
    if not torch.isfinite(flat_scores).all():
        raise ValueError("pred_scores must be finite")
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    return FrameMatches(flat_scores[order], tp[valid][order], rows[:, None].expand(-1, p_max)[valid][order], num_gt)


def _ap(tp: Tensor, copies: Tensor, num_gt: Tensor) -> Tensor:
    """All-point AP per row of ``copies`` (R, P): how many times each ranked prediction counts (0 for frames
    left out of a resample), with ``num_gt`` (R,) ground truths.

    Copies of a prediction are adjacent in the ranking, all true or all false positives: a run of true
    positives shares one interpolated precision (the precision rises along the run) and a run of false
    positives adds no recall, so counting them once with a weight gives the AP of the expanded ranking.
    """
    hits = copies * tp
    precision = hits.cumsum(1) / copies.cumsum(1).clamp(min=1)  # 0 before the first counted prediction
    # precision made non-increasing from the right, then summed over the recall steps (the true positives)
    interpolated = precision.flip(1).cummax(1).values.flip(1)
    return (hits * interpolated).sum(1) / num_gt


def _no_gt_error() -> ValueError:
    return ValueError("no ground-truth boxes in any frame: AP is undefined (recall has no denominator); "
                      "evaluate on frames that contain ground truth")


def average_precision(pred_boxes: Sequence[Tensor], pred_scores: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                      iou_threshold: float) -> float:
    """BEV AP of one class over frames at ``iou_threshold`` (all-point interpolation; see ``match_frames``)."""
    return matched_ap(match_frames(pred_boxes, pred_scores, gt_boxes, iou_threshold))


def matched_ap(m: FrameMatches) -> float:
    """AP of predictions already matched (``match_frames``)."""
    if m.total_gt == 0:
        raise _no_gt_error()
    ones = torch.ones(1, len(m.tp), dtype=torch.float64, device=m.tp.device)
    return float(_ap(m.tp, ones, m.num_gt.sum().double().view(1))[0])


def paired_bootstrap_delta_ap(frames_a: Detections, frames_b: Detections, gts: Sequence[Tensor], iou_threshold: float,
                              rounds: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """AP(A) - AP(B) on the same frames and its percentile interval at ``level``, resampling frames with
    replacement, the same draw for both models (paired). ``frames_a`` and ``frames_b`` are (boxes, scores),
    per-frame lists as in ``average_precision``; deterministic given ``seed``.

    In a resample, predictions of equal score from different frames rank in the frames' original order.
    Resamples that drew only frames without ground truth (AP undefined) are left out.
    """
    return paired_bootstrap_delta_matched(match_frames(*frames_a, gts, iou_threshold),
                                          match_frames(*frames_b, gts, iou_threshold), rounds, seed, level)


def paired_bootstrap_delta_matched(ma: FrameMatches, mb: FrameMatches, rounds: int = 1000, seed: int = 0,
                                   level: float = 0.95) -> tuple[float, float, float]:
    """``paired_bootstrap_delta_ap`` of two models' predictions already matched on the same frames."""
    return paired_bootstrap_delta_seeds([(ma, mb)], rounds, seed, level)


def paired_bootstrap_delta_seeds(pairs: Sequence[tuple[FrameMatches, FrameMatches]], rounds: int = 1000, seed: int = 0,
                                 level: float = 0.95) -> tuple[float, float, float]:
    """The mean over training seeds of AP(A) - AP(B), and its percentile interval: ``pairs`` holds each seed's two
    models matched on the same test frames (the same frames for every seed), and every resample draws the same
    frames for all of them, so frame-to-frame variation is resampled once and the seeds' models are averaged. The
    interval does not treat the seeds as a sample (three seeds cannot estimate their spread); the report gives the
    seeds' sd beside it. One pair is ``paired_bootstrap_delta_matched``."""
    if not pairs:
        raise ValueError("pairs is empty: give each seed's (model, baseline) matches")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    num_gt0 = pairs[0][0].num_gt
    for ma, mb in pairs:
        if not (torch.equal(ma.num_gt.cpu(), mb.num_gt.cpu()) and torch.equal(ma.num_gt.cpu(), num_gt0.cpu())):
            raise ValueError("the models' matches are of different frames (their ground-truth counts differ): "
                             "match every model of every seed on the same frames")
    if pairs[0][0].total_gt == 0:
        raise _no_gt_error()
    frames, device = len(num_gt0), num_gt0.device
    draws = torch.randint(frames, (rounds, frames), generator=torch.Generator().manual_seed(seed))
    copies = torch.zeros(rounds, frames, dtype=torch.float64).scatter_add_(1, draws, torch.ones(rounds, frames,
                                                                                              dtype=torch.float64))
    copies = copies.to(device)
    num_gt = copies @ num_gt0.double()
    # a resample of only car-free frames has no AP: it is left out (the interval is conditional on AP existing)
    defined = num_gt > 0
    copies, num_gt = copies[defined], num_gt[defined]

    def delta(c: Tensor, n: Tensor) -> Tensor:
        return sum(_ap(ma.tp, c[:, ma.frame], n) - _ap(mb.tp, c[:, mb.frame], n) for ma, mb in pairs) / len(pairs)

    full = delta(torch.ones(1, frames, dtype=torch.float64, device=device), num_gt0.sum().double().view(1))
    most = max(len(m.tp) for pair in pairs for m in pair)
    chunk = max(1, 2**22 // max(most, 1))  # rounds at a time, bounding (rounds, predictions) memory
    deltas = torch.cat([delta(c, n) for c, n in zip(copies.split(chunk), num_gt.split(chunk))]).cpu()
    low, high = torch.quantile(deltas, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return float(full[0]), low, high


def _aps(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name} is empty: give one AP per severity level")
    if not all(0 <= v <= 1 for v in values):
        raise ValueError(f"{name}: APs are fractions in [0, 1], got {values}; divide percentages by 100")
    return values


def corruption_error(ap_model: Sequence[float], ap_baseline: Sequence[float]) -> float:
    """Robo3D's corruption error of one corruption: sum_l (1 - AP_model,l) / sum_l (1 - AP_baseline,l) over its
    severity levels (below 1: fewer errors than the baseline)."""
    model, baseline = _aps(ap_model, "ap_model"), _aps(ap_baseline, "ap_baseline")
    if len(model) != len(baseline):
        raise ValueError(f"give one AP per severity level for both: got {len(model)} for the model and "
                         f"{len(baseline)} for the baseline")
    errors = sum(1 - v for v in baseline)
    if errors == 0:
        raise ValueError("the baseline has AP 1 at every level, so CE is undefined; choose a baseline that errs")
    return sum(1 - v for v in model) / errors


def resilience_rate(ap_levels: Sequence[float], ap_clean: float) -> float:
    """Robo3D's resilience rate of one corruption: sum_l AP_l / (L * AP_clean) over its L severity levels."""
    levels = _aps(ap_levels, "ap_levels")
    clean = _aps([ap_clean], "ap_clean")[0]
    if clean == 0:
        raise ValueError("ap_clean is 0, so RR is undefined; RR compares corrupted AP with a model's nonzero clean AP")
    return sum(levels) / (len(levels) * clean)


def _mean(values: Mapping[str, float], name: str) -> float:
    if not values:
        raise ValueError(f"no {name}: give a dict of corruption name -> value with at least one entry")
    return sum(float(v) for v in values.values()) / len(values)


def mean_ce(ce: Mapping[str, float]) -> float:
    """mCE: the mean corruption error over corruptions (name -> CE)."""
    return _mean(ce, "corruption errors")


def mean_rr(rr: Mapping[str, float]) -> float:
    """mRR: the mean resilience rate over corruptions (name -> RR)."""
    return _mean(rr, "resilience rates")
