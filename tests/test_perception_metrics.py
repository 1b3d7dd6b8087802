"""Perception metrics: rotated BEV IoU (against shapely), greedy matching and AP (against a plain-loop reference),
Robo3D's CE / RR and the paired bootstrap of an AP difference."""

import math
import random

import pytest
import torch

from sparsedistill.perception.metrics import (FrameMatches, _ap, average_precision, bev_corners, corruption_error,
                                              match_frames, matched_ap, mean_ce, mean_rr, paired_bootstrap_delta_ap,
                                              paired_bootstrap_delta_matched, paired_bootstrap_delta_seeds,
                                              resilience_rate, rotated_iou_bev)


def boxes(*rows: tuple[float, ...]) -> torch.Tensor:
    """BEV boxes from (x, y) or (x, y, l, w, yaw) rows; a car of 4 x 2 m heading +x by default."""
    return torch.tensor([r if len(r) == 5 else (*r, 4.0, 2.0, 0.0) for r in rows], dtype=torch.float32).view(-1, 5)


def random_boxes(n: int, g: torch.Generator, spread: float = 3.0, offset: tuple = (0.0, 0.0)) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=g) * spread + torch.tensor(offset)
    size = 0.5 + 4.5 * torch.rand(n, 2, generator=g)
    yaw = (2 * torch.rand(n, 1, generator=g) - 1) * math.pi
    return torch.cat([centre, size, yaw], 1)


def test_bev_corners_are_counter_clockwise_from_front_right():
    c = bev_corners(boxes((1.0, 2.0, 4.0, 2.0, 0.0), (0.0, 0.0, 4.0, 2.0, math.pi / 2)))
    assert torch.allclose(c[0], torch.tensor([[3.0, 1.0], [3.0, 3.0], [-1.0, 3.0], [-1.0, 1.0]]))
    # heading +y: the right side is +x, the front is +y
    assert torch.allclose(c[1, 0], torch.tensor([1.0, 2.0]), atol=1e-6)
    x, y = c.unbind(-1)
    area = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1)  # shoelace: positive when counter-clockwise
    assert torch.allclose(area, torch.tensor([8.0, 8.0]))


def test_rotated_iou_matches_shapely_on_random_pairs():
    shapely = pytest.importorskip("shapely")
    g = torch.Generator().manual_seed(0)
    for offset, dtype in (((0.0, 0.0), torch.float64), ((80.0, -60.0), torch.float32)):  # and far away in fp32
        a, b = random_boxes(25, g, offset=offset).to(dtype), random_boxes(25, g, offset=offset).to(dtype)
        iou = rotated_iou_bev(a, b)
        assert iou.dtype == dtype and iou.shape == (25, 25)
        pa = [shapely.Polygon(c) for c in bev_corners(a).double().tolist()]
        pb = [shapely.Polygon(c) for c in bev_corners(b).double().tolist()]
        ref = torch.tensor([[p.intersection(q).area / p.union(q).area for q in pb] for p in pa], dtype=torch.float64)
        assert (ref > 0).float().mean() > 0.5  # the pairs mostly overlap: the clipping is what is tested
        assert (iou.double() - ref).abs().max() < 1e-4


def test_rotated_iou_special_cases():
    g = torch.Generator().manual_seed(1)
    a = random_boxes(50, g, spread=100.0)
    assert torch.allclose(rotated_iou_bev(a, a).diagonal(), torch.ones(50), atol=1e-6)
    flipped = a + torch.tensor([0, 0, 0, 0, math.pi])  # the same rectangle, heading the other way
    assert torch.allclose(rotated_iou_bev(a, flipped).diagonal(), torch.ones(50), atol=1e-6)
    iou = rotated_iou_bev(a, a[:7])
    assert torch.allclose(iou, rotated_iou_bev(a[:7], a).T, atol=1e-6)
    car = boxes((0.0, 0.0))
    cases = {  # second box -> IoU with a 4 x 2 car at the origin heading +x
        (10.0, 0.0, 4.0, 2.0, 0.0): 0.0,  # disjoint
        (4.0, 0.0, 4.0, 2.0, 0.0): 0.0,  # touching along an edge
        (2.0, 0.0, 4.0, 2.0, 0.0): 1 / 3,  # half overlap, edges collinear
        (0.0, 0.0, 4.0, 2.0, math.pi / 2): 1 / 3,  # crossed: 2 x 2 of 8 + 8 - 4
        (0.2, 0.1, 1.0, 0.5, 1.0): 0.5 / 8,  # inside
        (1.0, 0.0, 2.0, 2.0, 0.0): 0.5,  # inside, sharing three edges' lines
        (0.0, 0.0, 0.0, 2.0, 0.0): 0.0,  # zero length
    }
    got = rotated_iou_bev(car, boxes(*cases))[0]
    assert torch.allclose(got, torch.tensor(list(cases.values())), atol=1e-6), got
    square = boxes((5.0, -3.0, 2.0, 2.0, 0.3))
    assert abs(float(rotated_iou_bev(square, square + torch.tensor([0, 0, 0, 0, math.pi / 2]))) - 1) < 1e-6
    degenerate = boxes((0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 2.0, 0.3))  # a point, a segment
    assert rotated_iou_bev(degenerate, degenerate).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # no area: no overlap, no 0 / 0
    assert rotated_iou_bev(a[:0], a[:3]).shape == (0, 3) and rotated_iou_bev(a[:3], a[:0]).shape == (3, 0)


def test_rotated_iou_with_collinear_and_touching_edges():
    shapely = pytest.importorskip("shapely")
    # boxes on a quarter-metre grid, sides multiples of half a metre, one heading (+ multiples of 90 degrees), far
    # from the origin: many pairs share edge lines or touch, where the clipping sees vertices on its lines
    g = torch.Generator().manual_seed(5)
    n, yaw = 60, 0.7
    grid = torch.randint(-8, 9, (n, 2), generator=g).double() / 4
    centre = torch.stack([grid[:, 0] * math.cos(yaw) - grid[:, 1] * math.sin(yaw),
                          grid[:, 0] * math.sin(yaw) + grid[:, 1] * math.cos(yaw)], 1) + torch.tensor([90.0, -40.0])
    size = torch.randint(1, 9, (n, 2), generator=g).double() / 2
    turns = torch.randint(0, 4, (n, 1), generator=g).double() * math.pi / 2
    b = torch.cat([centre, size, yaw + turns], 1)
    iou = rotated_iou_bev(b, b)
    assert iou.min() >= 0 and iou.max() <= 1  # no -1e-17 from a sliver polygon of touching boxes
    polys = [shapely.Polygon(c) for c in bev_corners(b).tolist()]
    ref = torch.tensor([[p.intersection(q).area / p.union(q).area for q in polys] for p in polys], dtype=torch.float64)
    assert (ref == 0).any() and ((ref > 0) & (ref < 1)).float().mean() > 0.2
    assert (iou - ref).abs().max() < 1e-6


def test_rotated_iou_rejects_bad_boxes():
    with pytest.raises(ValueError, match=r"columns \[0, 1, 3, 4, 6\]"):
        rotated_iou_bev(torch.zeros(2, 7), boxes((0.0, 0.0)))
    with pytest.raises(ValueError, match="l, w >= 0"):
        rotated_iou_bev(boxes((0.0, 0.0, -1.0, 2.0, 0.0)), boxes((0.0, 0.0)))
    with pytest.raises(ValueError, match="finite"):
        bev_corners(boxes((float("nan"), 0.0)))


def frames(*specs):
    """Per frame (gts, [(box, score), ...]) -> the three per-frame lists of ``average_precision``."""
    gts = [boxes(*gt) for gt, _ in specs]
    preds = [boxes(*[b for b, _ in p]) for _, p in specs]
    scores = [torch.tensor([s for _, s in p], dtype=torch.float32) for _, p in specs]
    return preds, scores, gts


FAR = (50.0, 50.0)  # a false positive: nowhere near any car


def test_average_precision_on_hand_made_cases():
    perfect = frames(([(0.0, 0.0), (10.0, 0.0)], [((10.0, 0.0), 0.2), ((0.0, 0.0), 0.9)]), ([], []),
                     ([(5.0, 5.0)], [((5.0, 5.0), 0.5)]))
    assert average_precision(*perfect, 0.7) == 1.0
    # a false positive above both hits: precisions 0, 1/2, 2/3 at recalls 0, 1/2, 1
    fp_first = frames(([(0.0, 0.0), (10.0, 0.0)], [(FAR, 0.9), ((0.0, 0.0), 0.8), ((10.0, 0.0), 0.7)]))
    assert average_precision(*fp_first, 0.5) == pytest.approx(2 / 3, abs=1e-12)
    # a duplicate of a found car is a false positive: hit, duplicate, hit
    duplicate = frames(([(0.0, 0.0), (10.0, 0.0)], [((0.0, 0.0), 0.9), ((0.1, 0.0), 0.8), ((10.0, 0.0), 0.7)]))
    assert match_frames(*duplicate, 0.5).tp.tolist() == [True, False, True]
    assert average_precision(*duplicate, 0.5) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    # a missed car caps recall at 1/2; a frame without predictions still counts its cars
    missed = frames(([(0.0, 0.0)], [((0.0, 0.0), 0.9)]), ([(10.0, 0.0)], []))
    assert average_precision(*missed, 0.5) == pytest.approx(0.5, abs=1e-12)
    # ranked over all frames: hit (0.9, frame 1), miss (0.5), hit (0.4) gives 5/6; frame by frame
    # (miss, hit, hit) would give 2/3
    global_sort = frames(([(0.0, 0.0)], [(FAR, 0.5), ((0.0, 0.0), 0.4)]), ([(10.0, 0.0)], [((10.0, 0.0), 0.9)]))
    assert average_precision(*global_sort, 0.5) == pytest.approx(5 / 6, abs=1e-12)
    m = match_frames(*global_sort, 0.5)
    assert m.frame.tolist() == [1, 0, 0] and m.tp.tolist() == [True, False, True] and m.total_gt == 2


def test_matching_is_greedy_by_score_to_the_best_unmatched_truth():
    # a (x = 0) and b (x = 1.5) overlap; the top prediction (x = 0.9) has IoU 0.63 with a and 0.74 with b: it takes
    # b, so the exact copy of b ranked second is a duplicate (taking a would make both hits)
    gts = [(0.0, 0.0), (1.5, 0.0)]
    spec = frames((gts, [((0.9, 0.0), 0.9), ((1.5, 0.0), 0.8)]))
    assert match_frames(*spec, 0.5).tp.tolist() == [True, False]
    assert average_precision(*spec, 0.5) == pytest.approx(0.5, abs=1e-12)  # recall 1/2 at precision 1
    # the order is the score's, not the IoU's: a looser box scored higher takes the car
    looser_first = frames(([(0.0, 0.0)], [((0.0, 0.05), 0.5), ((1.0, 0.0), 0.9)]))  # IoU 0.6 scored 0.9
    m = match_frames(*looser_first, 0.5)
    assert m.scores.tolist() == pytest.approx([0.9, 0.5]) and m.tp.tolist() == [True, False]
    assert match_frames(*looser_first, 0.7).tp.tolist() == [False, True]  # at 0.7 the looser box misses
    exact = frames(([(0.0, 0.0)], [((1.0, 0.0, 2.0, 2.0, 0.0), 0.9)]))  # IoU 4 / 8, exact in binary
    assert match_frames(*exact, 0.5).tp.tolist() == [True]  # IoU >= threshold is a hit, as in OpenCOOD


def test_average_precision_errors():
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        average_precision(*frames(([], [((0.0, 0.0), 0.9)]), ([], [])), 0.5)
    with pytest.raises(ValueError, match="one entry per frame"):
        average_precision([boxes((0.0, 0.0))], [torch.ones(1)], [], 0.5)
    with pytest.raises(ValueError, match=r"pred_scores\[0\]: expected one score per box"):
        average_precision([boxes((0.0, 0.0))], [torch.ones(2)], [boxes((0.0, 0.0))], 0.5)
    with pytest.raises(ValueError, match=r"iou_threshold must be in \(0, 1\]"):
        average_precision([boxes((0.0, 0.0))], [torch.ones(1)], [boxes((0.0, 0.0))], 0.0)


def reference_ap(preds, scores, gts, threshold):
    """Plain loops: greedy matching per frame by score, one stable ranking over all frames, VOC 2010 AP."""
    ranked = []  # (score, tp) in the order of the frames, then of the predictions
    for p, s, g in zip(preds, scores, gts):
        iou = rotated_iou_bev(p, g).tolist()
        free = list(range(len(g)))
        hits = {}
        for i in sorted(range(len(p)), key=lambda i: -float(s[i])):
            best = max(free, key=lambda j: iou[i][j], default=None)
            hits[i] = best is not None and iou[i][best] >= threshold
            if hits[i]:
                free.remove(best)
        ranked += [(float(s[i]), hits[i]) for i in range(len(p))]
    ranked.sort(key=lambda r: -r[0])
    total = sum(len(g) for g in gts)
    recall, precision, tp = [0.0], [0.0], 0
    for k, (_, hit) in enumerate(ranked, 1):
        tp += hit
        recall.append(tp / total)
        precision.append(tp / k)
    recall.append(1.0)
    precision.append(0.0)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return sum((recall[i] - recall[i - 1]) * precision[i] for i in range(1, len(recall)) if recall[i] != recall[i - 1])


def random_cars(g: torch.Generator, n_frames: int) -> list[torch.Tensor]:
    """Frames of 0-5 cars at random on a 30 m patch."""
    cars = []
    for _ in range(n_frames):
        n = int(torch.randint(0, 6, (), generator=g))
        yaw = (2 * torch.rand(n, 1, generator=g) - 1) * math.pi
        cars.append(torch.cat([torch.rand(n, 2, generator=g) * 30, 3.5 + torch.rand(n, 1, generator=g),
                               1.6 + 0.4 * torch.rand(n, 1, generator=g), yaw], 1))
    return cars


def detect(g: torch.Generator, cars: list[torch.Tensor], quality: float, tie_scores: bool = False):
    """A detector that finds each car with probability ``quality`` (jittered, at times twice) and adds 0-3 false
    positives a frame; its hits score higher the higher ``quality`` is. Returns (boxes, scores, cars)."""
    def rand() -> float:
        return float(torch.rand((), generator=g))

    jitter = torch.tensor([0.6, 0.6, 0.2, 0.2, 0.2])
    preds, scores = [], []
    for gt in cars:
        rows, s = [], []
        for box in gt:
            for _ in range(1 + (rand() < 0.2)):
                if rand() < quality:
                    rows.append(box + jitter * torch.randn(5, generator=g))
                    s.append(0.5 + 0.5 * rand() * quality)
        for _ in range(int(torch.randint(0, 4, (), generator=g))):
            rows.append(torch.cat([torch.rand(2, generator=g) * 30, torch.tensor([4.0, 1.8, 0.0])]))
            s.append(rand() * (1 - quality / 2))
        score = torch.tensor(s, dtype=torch.float32)
        preds.append(torch.stack(rows) if rows else torch.zeros(0, 5))
        scores.append(score.mul(10).floor().div(10) if tie_scores else score)  # ties within and across frames
    return preds, scores, cars


@pytest.mark.parametrize("tie_scores", [False, True])
def test_average_precision_matches_a_plain_loop_reference(tie_scores):
    g = torch.Generator().manual_seed(2)
    data = detect(g, random_cars(g, 40), quality=0.7, tie_scores=tie_scores)
    assert any(len(p) == 0 for p in data[0]) and any(len(t) == 0 for t in data[2])  # both kinds of empty frame occur
    aps = []
    for threshold in (0.3, 0.5, 0.7):
        ap = average_precision(*data, threshold)
        assert ap == pytest.approx(reference_ap(*data, threshold), abs=1e-12)
        aps.append(ap)
    assert 0 < aps[2] < aps[1] < aps[0] < 1  # the thresholds matter on this data


def test_weighted_ap_equals_ap_of_the_resampled_frames():
    # the bootstrap counts a frame drawn k times as k copies of its predictions; with distinct scores that is
    # the AP of the resampled frame list
    g = torch.Generator().manual_seed(3)
    preds, scores, gts = detect(g, random_cars(g, 15), quality=0.6)
    m = match_frames(preds, scores, gts, 0.5)
    rng = random.Random(0)
    for _ in range(5):
        draw = [rng.randrange(15) for _ in range(15)]
        copies = torch.bincount(torch.tensor(draw), minlength=15).double()
        n = (copies @ m.num_gt.double()).view(1)
        weighted = float(_ap(m.tp, copies[m.frame][None], n)[0])
        expanded = average_precision([preds[f] for f in draw], [scores[f] for f in draw], [gts[f] for f in draw], 0.5)
        assert weighted == pytest.approx(expanded, abs=1e-12)


def test_paired_bootstrap():
    g = torch.Generator().manual_seed(4)
    gts = random_cars(g, 40)
    good, weak = detect(g, gts, quality=0.95), detect(g, gts, quality=0.4)
    same = paired_bootstrap_delta_ap(good[:2], good[:2], gts, 0.5, rounds=200)
    assert same == (0.0, 0.0, 0.0)
    delta, low, high = paired_bootstrap_delta_ap(good[:2], weak[:2], gts, 0.5, rounds=500, seed=1)
    assert delta == pytest.approx(average_precision(*good, 0.5) - average_precision(*weak, 0.5), abs=1e-12)
    assert 0 < low < delta < high
    assert paired_bootstrap_delta_ap(good[:2], weak[:2], gts, 0.5, rounds=500, seed=1) == (delta, low, high)
    narrow = paired_bootstrap_delta_ap(good[:2], weak[:2], gts, 0.5, rounds=500, seed=1, level=0.5)
    assert low < narrow[1] < narrow[2] < high
    other = paired_bootstrap_delta_ap(good[:2], weak[:2], gts, 0.5, rounds=500, seed=2)
    assert other[0] == delta and other[1:] != (low, high)
    swapped = paired_bootstrap_delta_ap(weak[:2], good[:2], gts, 0.5, rounds=500, seed=1)
    assert swapped == pytest.approx((-delta, -high, -low), abs=1e-12)
    one_car = [boxes((0.0, 0.0))] + [t[:0] for t in gts[1:]]  # a resample misses frame 0 with probability 0.36
    # resamples without frame 0 have no AP and are left out: every kept one holds the car, found by one model only
    found = ([b.clone() for b in one_car], [torch.ones(len(b)) for b in one_car])
    missed = ([b[:0] for b in one_car], [torch.ones(0) for _ in one_car])
    assert paired_bootstrap_delta_ap(found, missed, one_car, 0.5, rounds=50) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_over_seeds_averages_each_seeds_delta_on_the_same_frame_draws():
    g = torch.Generator().manual_seed(5)
    gts = random_cars(g, 40)
    pairs = [(match_frames(*detect(g, gts, quality=q)[:2], gts, 0.5), match_frames(*detect(g, gts, quality=0.4)[:2], gts, 0.5))
             for q in (0.95, 0.7, 0.6)]  # three seeds of a model and of its baseline
    one = [paired_bootstrap_delta_matched(a, b, rounds=400, seed=1) for a, b in pairs]
    delta, low, high = paired_bootstrap_delta_seeds(pairs, rounds=400, seed=1)
    assert delta == pytest.approx(sum(d for d, _, _ in one) / 3, abs=1e-12)
    assert low < delta < high
    # the same draws for every seed: one seed three times is that seed's own result (independent draws would widen it)
    assert paired_bootstrap_delta_seeds([pairs[0]] * 3, rounds=400, seed=1) == pytest.approx(one[0], abs=1e-12)
    assert high - low <= sum(h - lo for _, lo, h in one) / 3 + 1e-12
    # one pair is the single-seed bootstrap, as computed before it delegated here (5629515)
    assert one[0] == (0.3526384147821174, 0.240939895630103, 0.49646188592213497)
    with pytest.raises(ValueError, match="different frames"):
        paired_bootstrap_delta_seeds([pairs[0], (pairs[1][0], match_frames(*detect(g, gts[:-1], quality=0.4)[:2],
                                                                          gts[:-1], 0.5))])
    with pytest.raises(ValueError, match="pairs is empty"):
        paired_bootstrap_delta_seeds([])


def test_matches_stored_by_frame_rebuild_the_same_ranking_ap_and_bootstrap():
    """What the DSRC recipe keeps of a detect job (scores, true-positive flags and counts per frame) gives back the
    ranking exactly, ties across and within frames included, so AP and the bootstrap need no boxes."""
    g = torch.Generator().manual_seed(7)
    gts = random_cars(g, 30)
    preds, scores, _ = detect(g, gts, quality=0.7)
    scores = [(s * 4).round() / 4 for s in scores]  # coarse scores: many ties
    m = match_frames(preds, scores, gts, 0.5)
    s, tp, counts = m.by_frame()
    assert counts.tolist() == [len(p) for p in preds]
    again = FrameMatches.from_frames(s.float(), tp.to(torch.uint8), counts.int(), m.num_gt.int())
    for field in ("scores", "tp", "frame", "num_gt"):
        assert torch.equal(getattr(again, field), getattr(m, field)), field
    assert matched_ap(again) == average_precision(preds, scores, gts, 0.5)
    weak = detect(g, gts, quality=0.4)[:2]
    assert paired_bootstrap_delta_matched(again, match_frames(*weak, gts, 0.5), rounds=100, seed=3) == \
        paired_bootstrap_delta_ap((preds, scores), weak, gts, 0.5, rounds=100, seed=3)
    with pytest.raises(ValueError, match="different frames"):
        paired_bootstrap_delta_matched(again, match_frames(*weak, [t[:0] for t in gts], 0.5))
    with pytest.raises(ValueError, match="inconsistent matches"):
        FrameMatches.from_frames(s, tp, counts[:-1], m.num_gt)


def test_corruption_error_and_resilience_rate():
    assert corruption_error([0.8, 0.6, 0.4], [0.7, 0.5, 0.3]) == pytest.approx(1.2 / 1.5)
    assert resilience_rate([0.8, 0.6, 0.4], 0.9) == pytest.approx(1.8 / 2.7)
    assert mean_ce({"fog": 0.8, "snow": 1.1}) == pytest.approx(0.95)
    assert mean_rr({"fog": 2 / 3, "snow": 0.5}) == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="ap_model is empty"):
        corruption_error([], [])
    with pytest.raises(ValueError, match="got 2 for the model and 3 for the baseline"):
        corruption_error([0.5, 0.4], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="baseline has AP 1 at every level"):
        corruption_error([0.5], [1.0])
    with pytest.raises(ValueError, match="divide percentages by 100"):
        resilience_rate([80.0, 60.0], 90.0)
    with pytest.raises(ValueError, match="ap_clean is 0"):
        resilience_rate([0.0], 0.0)
    with pytest.raises(ValueError, match="no resilience rates"):
        mean_rr({})
