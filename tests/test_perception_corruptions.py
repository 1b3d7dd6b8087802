"""Corruptions as data: deterministic per seed, worse at each level by the quantity each one changes, clear errors."""

import pytest
import torch

from sparsedistill.perception.corruptions import LEVELS, ScanContext, corrupt, corruption_names
from sparsedistill.perception.frames import SimConfig, corrupt_frame, simulate_frame, split_seeds
from sparsedistill.perception.geometry import boxes_between, points_in_boxes
from sparsedistill.perception.lidar import LidarConfig
from sparsedistill.perception.scene import SceneConfig

SIM = SimConfig(SceneConfig(agents=(3, 3)), LidarConfig(rings=32, azimuths=512))


@pytest.fixture(scope="module")
def frame():
    return simulate_frame(5, SIM)


def _ctx(frame, a=0):
    pose = frame.poses[a]
    return ScanContext(rings=32, sensor_height=float(pose[2]), boxes=boxes_between(frame.boxes, None, pose))


def _measure(name, p, clean, ctx):
    """The quantity corruption ``name`` should make worse as the level rises (larger = worse)."""
    r = p[:, :3].norm(dim=1)
    if name in ("beam_missing", "cross_sensor"):
        return -len(p)
    if name == "motion_blur":
        return (p[:, :3] - clean[:, :3]).norm(dim=1).mean()
    if name == "crosstalk":
        return ((p[:, :3] - clean[:, :3]).norm(dim=1) > 1e-6).float().mean()
    if name in ("fog", "snow"):
        return (r < 6).float().sum() - len(p)  # clutter near the sensor, returns lost
    if name == "incomplete_echo":
        return -(points_in_boxes(p, ctx.boxes, margin=0.1) >= 0).sum()
    if name == "wet_ground":
        return -(p[:, 2] < -ctx.sensor_height + 0.1).sum()
    raise AssertionError(name)


@pytest.mark.parametrize("name", corruption_names())
def test_each_corruption_is_seeded_and_worse_at_each_level(frame, name):
    clean, ctx = frame.points[0], _ctx(frame)
    worse = []
    for level in LEVELS:
        out = corrupt(clean, name, level, seed=1, ctx=ctx)
        assert out.shape[1] == 5 and torch.isfinite(out).all() and 0 < len(out) <= len(clean)
        assert torch.equal(out, corrupt(clean, name, level, seed=1, ctx=ctx))
        assert not torch.equal(out, clean)
        assert (out[:, 3] >= 0).all() and (out[:, 3] <= 1).all()
        worse.append(float(_measure(name, out, clean, ctx)))
    assert worse[0] < worse[1] < worse[2], (name, worse)
    if name != "cross_sensor":  # a sensor's rings and point order are fixed: no draws
        assert not torch.equal(corrupt(clean, name, 2, seed=1, ctx=ctx), corrupt(clean, name, 2, seed=2, ctx=ctx))


def test_dsrc_settings_sit_at_the_middle_level(frame):
    clean = frame.points[0]
    rings = set(clean[:, 4].long().tolist())
    left = set(corrupt(clean, "beam_missing", 2, seed=0, ctx=_ctx(frame))[:, 4].long().tolist())
    assert len(left) == len(rings) // 2  # DSRC: 32 of 64 rings dropped
    sensor = corrupt(clean, "cross_sensor", 2, seed=0, ctx=_ctx(frame))
    assert set(sensor[:, 4].long().tolist()) == {r for r in rings if r % 2 == 0}
    assert abs(len(sensor) - (clean[:, 4] % 2 == 0).sum() / 2) <= 1
    moved = corrupt(clean, "crosstalk", 2, seed=0, ctx=_ctx(frame))
    share = ((moved[:, :3] - clean[:, :3]).norm(dim=1) > 1e-6).float().mean()
    assert 0.005 < share < 0.015  # 1 % of the points


def test_corrupt_frame_hits_every_agent_in_its_own_frame(frame):
    out = corrupt_frame(frame, "incomplete_echo", 3, rings=32)
    for a in range(frame.num_agents):
        ctx = _ctx(frame, a)
        before = (points_in_boxes(frame.points[a], ctx.boxes, margin=0.1) >= 0).sum()
        after = (points_in_boxes(out.points[a], ctx.boxes, margin=0.1) >= 0).sum()
        assert after < 0.15 * before
    assert corrupt_frame(frame, "clean", 1, rings=32) is frame
    again = corrupt_frame(frame, "fog", 2, rings=32)
    assert all(torch.equal(x, y) for x, y in zip(again.points, corrupt_frame(frame, "fog", 2, rings=32).points))


def test_bad_input_gets_clear_errors(frame):
    p = frame.points[0]
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(p, "rain", 1, 0)
    with pytest.raises(ValueError, match="severity level must be one of"):
        corrupt(p, "fog", 4, 0)
    with pytest.raises(ValueError, match=r"expected a scan \(N, 5\)"):
        corrupt(p[:, :4], "fog", 1, 0)
    bad = p.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        corrupt(bad, "fog", 1, 0)
    with pytest.raises(ValueError, match="needs the cars' boxes"):
        corrupt(p, "incomplete_echo", 1, 0, ScanContext())
    assert corrupt(p[:0], "snow", 3, 0).shape == (0, 5)  # an empty scan stays empty
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("dev", 3)
    assert list(split_seeds("test", 2)) == [2_000_000, 2_000_001]


def test_ring_count_must_match_the_scan(frame):
    with pytest.raises(ValueError, match="ScanContext.rings is 16"):
        corrupt(frame.points[0], "beam_missing", 2, 0, ScanContext(rings=16))
