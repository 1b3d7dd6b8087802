"""The LiDAR simulator: seeded scenes, the PyTorch ray caster against independent references, frames and boxes."""

import math

import numpy as np
import pytest
import torch

from sparsedistill.perception.geometry import boxes_between, points_between, points_in_boxes, points_to_world
from sparsedistill.perception.lidar import LidarConfig, cast_rays, ray_directions, scan
from sparsedistill.perception.metrics import rotated_iou_bev
from sparsedistill.perception.scene import SceneConfig, simulate_scene


def _box_triangles(boxes: np.ndarray) -> np.ndarray:
    """(P * 12, 3, 3) triangles of oriented boxes (x, y, z, l, w, h, yaw)."""
    tris = []
    faces = [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)]
    for x, y, z, l, w, h, yaw in boxes:
        c, s = math.cos(yaw), math.sin(yaw)
        corners = []
        for dz in (-h / 2, h / 2):
            for dx, dy in ((l / 2, w / 2), (-l / 2, w / 2), (-l / 2, -w / 2), (l / 2, -w / 2)):
                corners.append((x + c * dx - s * dy, y + s * dx + c * dy, z + dz))
        for a, b, cc, d in faces:
            tris += [(corners[a], corners[b], corners[cc]), (corners[a], corners[cc], corners[d])]
    return np.array(tris, dtype=np.float64)


def _first_hits_reference(origin: np.ndarray, dirs: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Moller-Trumbore against every triangle plus the ground plane, in float64 with NumPy: (R,) distances."""
    v0, e1, e2 = tris[:, 0], tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]
    out = np.full(len(dirs), np.inf)
    for i, d in enumerate(dirs):
        p = np.cross(d, e2)
        det = (e1 * p).sum(1)
        ok = np.abs(det) > 1e-12
        inv = np.where(ok, 1.0 / np.where(ok, det, 1), 0)
        tv = origin - v0
        u = (tv * p).sum(1) * inv
        q = np.cross(tv, e1)
        v = (d * q).sum(1) * inv
        t = (e2 * q).sum(1) * inv
        good = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
        best = t[good].min() if good.any() else np.inf
        if d[2] < 0:
            best = min(best, -origin[2] / d[2])
        out[i] = best
    return out


@pytest.fixture(scope="module")
def scene():
    return simulate_scene(3)


def test_scenes_are_a_function_of_the_seed(scene):
    again, other = simulate_scene(3), simulate_scene(4)
    assert torch.equal(scene.primitives, again.primitives) and torch.equal(scene.poses, again.poses)
    assert not torch.equal(scene.primitives[:5], other.primitives[:5])
    cfg = SceneConfig()
    for seed in range(60):  # seed 41 had two cars on one spot of the side street
        s = simulate_scene(seed)
        assert cfg.agents[0] <= s.num_agents <= cfg.agents[1] and len(set(s.agents.tolist())) == s.num_agents
        ego = s.boxes[s.agents[0], :2]
        assert (s.boxes[s.agents, :2] - ego).norm(dim=1).max() <= cfg.comm_range  # collaborators within range
        assert (s.owner[s.owner >= 0] < len(s.boxes)).all()
        # no two cars overlap
        iou = rotated_iou_bev(s.boxes[:, [0, 1, 3, 4, 6]], s.boxes[:, [0, 1, 3, 4, 6]])
        assert (iou - torch.eye(len(iou))).abs().max() < 1e-6
    with pytest.raises(ValueError, match="agents must be a range"):
        SceneConfig(agents=(3, 2))


def test_ray_caster_matches_a_triangle_reference(scene):
    cfg = LidarConfig(rings=16, azimuths=64)
    dirs, _ = ray_directions(cfg)
    origin = scene.poses[0, :3]
    others = scene.owner != scene.agents[0]
    dist, hit, normal = cast_rays(origin, dirs, scene.primitives[others], max_range=1e4, chunk=100)
    ref = _first_hits_reference(origin.double().numpy(), dirs.double().numpy(), _box_triangles(scene.primitives[others].double().numpy()))
    finite = np.isfinite(ref)
    assert finite.mean() > 0.5  # the check covers hits on boxes and the ground, not only misses
    assert ((hit == -2).numpy() == ~finite).all()
    assert np.allclose(dist.numpy()[finite], ref[finite], rtol=1e-4, atol=1e-3)
    assert torch.allclose(normal[hit > -2].norm(dim=1), torch.ones(int((hit > -2).sum())))
    assert ((normal * dirs).sum(1)[hit > -2] < 1e-6).all()  # a hit surface faces the ray


def test_ray_caster_matches_open3d(scene):
    o3d = pytest.importorskip("open3d")
    cfg = LidarConfig(rings=32, azimuths=256)
    dirs, _ = ray_directions(cfg)
    origin = scene.poses[1, :3]
    prims = scene.primitives[scene.owner != scene.agents[1]]
    dist, hit, _ = cast_rays(origin, dirs, prims, max_range=1e4)
    tris = _box_triangles(prims.double().numpy())
    ground = np.array([[[-1e3, -1e3, 0], [1e3, -1e3, 0], [1e3, 1e3, 0]], [[-1e3, -1e3, 0], [1e3, 1e3, 0], [-1e3, 1e3, 0]]])
    tris = np.concatenate([tris, ground]).reshape(-1, 3).astype(np.float32)
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(o3d.core.Tensor(tris), o3d.core.Tensor(np.arange(len(tris), dtype=np.uint32).reshape(-1, 3)))
    rays = np.concatenate([np.broadcast_to(origin.numpy(), (len(dirs), 3)), dirs.numpy()], 1).astype(np.float32)
    t = rc.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    finite = np.isfinite(t) & (t < 1e3)
    assert ((hit == -2).numpy() == ~finite).mean() > 0.999  # grazing rays along an edge may disagree
    both = finite & (hit > -2).numpy()
    assert np.median(np.abs(dist.numpy()[both] - t[both])) < 1e-4 and (np.abs(dist.numpy()[both] - t[both]) < 1e-2).mean() > 0.999


def test_scan_fields_noise_dropout_and_own_car(scene):
    cfg = LidarConfig(rings=32, azimuths=512, dropout=0.1)
    pts = scan(scene, 1, cfg, seed=0)
    assert pts.shape[1] == 5 and torch.equal(pts, scan(scene, 1, cfg, seed=0))
    assert not torch.equal(pts, scan(scene, 1, cfg, seed=1))  # noise and dropout follow the seed
    assert (pts[:, 3] >= 0).all() and (pts[:, 3] <= 1).all() and set(pts[:, 4].unique().tolist()) <= set(range(32))
    assert (pts[:, :3].norm(dim=1) <= cfg.max_range + 0.2).all()
    clean = scan(scene, 1, LidarConfig(rings=32, azimuths=512, dropout=0.0, range_noise=0.0))
    assert 0.85 < len(pts) / len(clean) < 0.95  # 10 % dropped
    # the agent's own car is not in its scan; the other cars are
    world = points_to_world(clean, scene.poses[1])
    holder = points_in_boxes(world, scene.boxes, margin=0.05)
    assert not (holder == scene.agents[1]).any() and (holder >= 0).sum() > 100
    # noiseless ground returns lie on z = 0
    ground = world[holder < 0]
    assert (ground[:, 2].abs() < 1e-3).float().mean() > 0.5
    with pytest.raises(ValueError, match="agent 9 does not exist"):
        scan(scene, 9)


def test_frames_round_trip_and_points_in_boxes():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(100, 4, generator=g) * 10
    a, b = torch.tensor([3.0, -2.0, 1.8, 0.7]), torch.tensor([-20.0, 5.0, 1.9, -2.5])
    back = points_between(points_between(pts, a, b), b, a)
    assert torch.allclose(back, pts, atol=1e-4) and torch.equal(back[:, 3], pts[:, 3])
    boxes = torch.tensor([[1.0, 2.0, 0.8, 4.0, 2.0, 1.6, 0.5], [-5.0, 0.0, 0.8, 4.5, 1.8, 1.5, -1.2]])
    in_b = boxes_between(boxes, None, b)
    assert torch.allclose(boxes_between(in_b, b, a), boxes_between(boxes, None, a), atol=1e-4)
    # a point at each box's centre, one moved along its length just inside and just outside, and one far away
    heading = torch.stack([boxes[:, 6].cos(), boxes[:, 6].sin()], 1)
    inside = boxes[:, :3].clone()
    inside[:, :2] += heading * (boxes[:, 3:4] / 2 - 0.05)
    outside = boxes[:, :3].clone()
    outside[:, :2] += heading * (boxes[:, 3:4] / 2 + 0.05)
    q = torch.cat([boxes[:, :3], inside, outside, torch.tensor([[100.0, 100.0, 0.0]])])
    assert points_in_boxes(q, boxes).tolist() == [0, 1, 0, 1, -1, -1, -1]
    assert points_in_boxes(q, boxes, margin=0.1).tolist()[4:6] == [0, 1]
    # the same points seen from another pose, with the boxes moved alike: the same answer
    assert torch.equal(points_in_boxes(points_between(q, torch.zeros(4), b), in_b), points_in_boxes(q, boxes))
    assert points_in_boxes(q[:0], boxes).shape == (0,) and (points_in_boxes(q, boxes[:0]) == -1).all()


def test_simulated_frames_are_cached_once_and_shared(tmp_path, monkeypatch):
    """A second process (here: a second call) asking for the same frames loads the first one's file, bit for bit;
    another config gets its own file; two processes asking at once share the work (a flock per shard of frames)."""
    import subprocess
    import sys

    from sparsedistill.perception import frames as frames_mod
    from sparsedistill.perception.frames import SimConfig, simulate_frames

    sim = SimConfig(SceneConfig(agents=(2, 3)), LidarConfig(rings=16, azimuths=128))
    first = simulate_frames(range(2), sim, cache_dir=tmp_path)
    monkeypatch.setattr(frames_mod, "simulate_frame", lambda *a, **k: pytest.fail("simulated again"))
    again = simulate_frames(range(2), sim, cache_dir=tmp_path)
    for a, b in zip(first, again):
        assert a.seed == b.seed and all(torch.equal(p, q) for p, q in zip(a.points, b.points))
        assert torch.equal(a.poses, b.poses) and torch.equal(a.boxes, b.boxes) and torch.equal(a.agent_boxes, b.agent_boxes)
    assert len(list(tmp_path.glob("frames-*.pt"))) == 1
    monkeypatch.undo()
    simulate_frames(range(2), SimConfig(SceneConfig(agents=(2, 3)), LidarConfig(rings=32, azimuths=128)),
                    cache_dir=tmp_path)
    assert len(list(tmp_path.glob("frames-*.pt"))) == 2
    # two processes at once: each logs whether it simulated; exactly one did
    code = ("import sys; from sparsedistill.perception import frames as f; from sparsedistill.perception.lidar import "
            "LidarConfig; from sparsedistill.perception.scene import SceneConfig; n = [0]; sim0 = f.simulate_frame\n"
            "def counted(*a, **k):\n    n[0] += 1; return sim0(*a, **k)\n"
            "f.simulate_frame = counted\n"
            "f.simulate_frames(range(3), f.SimConfig(SceneConfig(agents=(2, 2)), LidarConfig(rings=16, azimuths=128)), "
            "cache_dir=sys.argv[1], shard=1); print(n[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    counts = [int(p.communicate(timeout=300)[0].strip()) for p in procs]
    assert sum(counts) == 3  # every frame simulated once, by whichever process took its shard
    assert len(list((tmp_path / "shared").glob("frames-*.pt"))) == 3
    # a shard lost (a run cut mid-write leaves none: writes are atomic) is simulated again, the others loaded
    victim = sorted((tmp_path / "shared").glob("frames-*.pt"))[1]
    victim.unlink()
    calls = []
    monkeypatch.setattr(frames_mod, "simulate_frame", lambda s, *a, **k: calls.append(s) or frames_mod.Frame(
        [torch.zeros(1, 5)], torch.zeros(1, 4), torch.zeros(1, 7), torch.zeros(1, dtype=torch.long), s))
    again = simulate_frames(range(3), SimConfig(SceneConfig(agents=(2, 2)), LidarConfig(rings=16, azimuths=128)),
                            cache_dir=tmp_path / "shared", shard=1)
    assert calls == [1] and [f.seed for f in again] == [0, 1, 2]
    # another shard size keeps files of its own (never another size's shard under the same name)
    other = simulate_frames(range(3), SimConfig(SceneConfig(agents=(2, 2)), LidarConfig(rings=16, azimuths=128)),
                            cache_dir=tmp_path / "shared", shard=2)
    assert [f.seed for f in other] == [0, 1, 2]
