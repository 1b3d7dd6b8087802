"""The cooperative detector's parts: dynamic pillars, fusion across agents, anchors and box coding, NMS, the whole net."""

import math

import pytest
import torch

from sparsedistill.models import create_model
from sparsedistill.perception.anchors import (AnchorConfig, assign_targets, decode, detection_loss, encode, make_anchors,
                                              nms_bev, postprocess)
from sparsedistill.perception.frames import SimConfig, simulate_frame
from sparsedistill.perception.fusion import attention_fusion, ego_only, max_fusion
from sparsedistill.perception.lidar import LidarConfig
from sparsedistill.perception.metrics import average_precision
from sparsedistill.perception.pillars import BEVGrid, PillarEncoder, scatter_pillars
from sparsedistill.perception.scene import SceneConfig

GRID = BEVGrid((-25.6, 25.6), (-12.8, 12.8))


def test_pillars_keep_every_point_in_the_grid_and_pool_by_cell():
    pts = torch.tensor([[0.1, 0.1, 0.0, 0.5], [0.3, 0.2, -1.0, 0.2], [30.0, 0.0, 0.0, 0.1], [-0.1, 0.1, 0.5, 0.9],
                        [0.0, 0.0, 5.0, 0.3]])  # 3rd outside in x, 5th above the z range
    kept, cell, deco = scatter_pillars(pts, torch.zeros(5, dtype=torch.long), GRID, 1)
    h, w = GRID.shape
    assert len(kept) == 3 and cell.tolist() == [32 * w + 64, 32 * w + 64, 32 * w + 63]
    assert torch.allclose(deco[:2, :3].sum(0), torch.zeros(3), atol=1e-6)  # offsets to the pillar mean cancel out
    assert torch.allclose(deco[0, 3:], torch.tensor([-0.1, -0.1]), atol=1e-6)  # offset to the pillar centre (0.2, 0.2)
    enc = PillarEncoder(GRID, 4, 8).eval()
    bev = enc(pts, torch.zeros(5, dtype=torch.long), 1)
    assert bev.shape == (1, 8, h, w) and (bev >= 0).all()
    occupied = (bev.abs().sum(1) > 0).nonzero().tolist()
    assert set(map(tuple, occupied)) <= {(0, 32, 64), (0, 32, 63)}
    shuffled = enc(pts[[4, 3, 2, 1, 0]], torch.zeros(5, dtype=torch.long), 1)
    assert torch.allclose(bev, shuffled)  # a set of points, not a sequence
    enc.train()(pts[:1], torch.zeros(1, dtype=torch.long), 1)  # one point in training: running statistics, no error
    bad = pts.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        enc(bad, torch.zeros(5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="takes 4 values per point"):
        enc(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="multiple of 8 pillars"):
        BEVGrid((-10.0, 10.0), (-10.0, 10.0))
    assert enc(pts[:0], torch.zeros(0, dtype=torch.long), 2).abs().sum() == 0  # no points: empty maps


def test_fusion_keeps_the_ego_view_and_mixes_agents_per_cell():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 4, 3, 3, generator=g)
    agents = [1, 3, 1]
    att = attention_fusion(x, agents)
    assert att.shape == (3, 4, 3, 3)
    assert torch.allclose(att[0], x[0]) and torch.allclose(att[2], x[4])  # alone: its own features
    mixed = att[1]
    assert (mixed <= x[1:4].amax(0) + 1e-6).all() and (mixed >= x[1:4].amin(0) - 1e-6).all()  # a convex mix
    assert not torch.allclose(mixed, x[1])
    v = x[1:4].flatten(2).permute(2, 0, 1)  # (cells, agents, C): at each cell the ego's scaled dot-product attention
    want = (torch.softmax(v[:, :1] @ v.transpose(1, 2) / 4**0.5, -1) @ v).squeeze(1).T.reshape(4, 3, 3)
    assert torch.allclose(mixed, want, atol=1e-6)
    assert torch.equal(ego_only(x, agents), x[[0, 1, 4]])
    assert torch.equal(max_fusion(x, agents)[1], x[1:4].amax(0))


def test_box_coding_round_trips_and_targets_follow_iou():
    cfg = AnchorConfig()
    anchors = make_anchors(GRID, cfg)
    assert anchors.shape == (32, 64, 2, 7)
    flat = anchors.view(-1, 7)
    g = torch.Generator().manual_seed(1)
    boxes = flat[:10] + torch.randn(10, 7, generator=g) * torch.tensor([0.3, 0.3, 0.1, 0.2, 0.1, 0.1, 0.2])
    assert torch.allclose(decode(encode(boxes, flat[:10]), flat[:10]), boxes, atol=1e-5)
    car = flat[1000].clone()  # a car exactly on an anchor, another far from every anchor's yaw and place
    labels, targets = assign_targets(flat, car[None], cfg)
    assert labels[1000] == 1 and torch.allclose(targets[1000], torch.zeros(7), atol=1e-6)
    assert (labels == 1).sum() >= 1 and (labels[(flat[:, :2] - car[:2]).norm(dim=1) > 6] == 0).all()
    odd = torch.tensor([[3.1, 2.9, -1.1, 4.0, 1.7, 1.5, math.pi / 4]])  # 45 degrees: below pos_iou with both anchors
    labels, _ = assign_targets(flat, odd, cfg)
    assert (labels == 1).sum() == 1  # its best anchor is still claimed
    labels, targets = assign_targets(flat, torch.zeros(0, 7), cfg)
    assert (labels == 0).all() and (targets == 0).all()


def test_loss_and_nms():
    labels = torch.tensor([1, 0, 0, -1])
    targets = torch.zeros(4, 7)
    good = detection_loss(torch.tensor([8.0, -8.0, -8.0, 0.0]), torch.zeros(4, 7), labels, targets)[0]
    bad = detection_loss(torch.tensor([-8.0, 8.0, 8.0, 0.0]), torch.ones(4, 7), labels, targets)[0]
    assert good < 1e-3 < bad
    flipped = torch.zeros(4, 7)
    flipped[0, 6] = math.pi  # yaw off by pi is the same BEV box: no regression loss
    assert detection_loss(torch.tensor([8.0, -8.0, -8.0, 0.0]), flipped, labels, targets)[0] < 1e-3
    # the box term, masked over every anchor, is the smooth-L1 of the positives alone (others' outputs ignored)
    g = torch.Generator().manual_seed(0)
    reg, tgt, lab = torch.randn(64, 7, generator=g) * 3, torch.randn(64, 7, generator=g), torch.randint(-1, 2, (64,), generator=g)
    box = detection_loss(torch.randn(64, generator=g), reg, lab, tgt)[1]["box"]
    rp, tp = reg[lab == 1], tgt[lab == 1]
    sin_err = [(rp[:, 6].sin() * tp[:, 6].cos())[:, None], (rp[:, 6].cos() * tp[:, 6].sin())[:, None]]
    ref = torch.nn.functional.smooth_l1_loss(torch.cat([rp[:, :6], sin_err[0]], 1), torch.cat([tp[:, :6], sin_err[1]], 1),
                                             beta=1 / 9, reduction="sum") / len(rp)
    assert len(rp) > 10 and torch.allclose(box, ref)
    boxes = torch.tensor([[0, 0, 0, 4, 2, 1.5, 0], [0.2, 0, 0, 4, 2, 1.5, 0.05], [10, 0, 0, 4, 2, 1.5, 0]], dtype=torch.float32)
    keep = nms_bev(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.15, 10)
    assert keep.tolist() == [1, 2]
    assert nms_bev(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.15, 1).tolist() == [1]


def test_detector_learns_one_frame_and_finds_its_cars():
    """Overfitting one simulated frame: a broken assignment, coding, fusion or decoding would not reach AP 0.5."""
    torch.manual_seed(0)
    sim = SimConfig(SceneConfig(agents=(3, 3)), LidarConfig(rings=32, azimuths=512))
    frame = simulate_frame(12, sim)
    model = create_model("coop_detector_tiny")
    grid = model.cfg.grid
    pts = [frame.points_in_ego(a)[:, :4] for a in range(frame.num_agents)]
    cloud = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pts)])
    points = torch.cat(pts)
    gt = frame.boxes_in_ego()
    gt = gt[(gt[:, 0].abs() < grid.x_range[1] - 2) & (gt[:, 1].abs() < grid.y_range[1] - 2)]
    assert len(gt) >= 3
    anchors = make_anchors(grid, model.cfg.anchors).view(-1, 7)
    labels, targets = assign_targets(anchors, gt, model.cfg.anchors)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    flat = lambda o: (o["cls"].permute(0, 2, 3, 1).reshape(-1), o["reg"].permute(0, 2, 3, 1).reshape(-1, 7))  # noqa: E731
    first = None
    for _ in range(50):
        loss, _ = detection_loss(*flat(model(points, cloud, [frame.num_agents])), labels, targets)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    with torch.no_grad():  # BatchNorm's running statistics (momentum 0.01) lag after 50 steps: set them to this frame's
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model(points, cloud, [frame.num_agents])
    model.eval()
    with torch.no_grad():
        boxes, scores = postprocess(*flat(model(points, cloud, [frame.num_agents])), anchors, model.cfg.anchors)
    bev = [0, 1, 3, 4, 6]
    ap = average_precision([boxes[:, bev]], [scores], [gt[:, bev]], 0.5)
    assert ap > 0.5
    with pytest.raises(ValueError, match="at least its ego's cloud"):
        model(points, cloud, [0])


def test_detector_runs_under_bf16_autocast_and_checks_its_cloud_index():
    model = create_model("coop_detector_tiny")
    pts = torch.tensor([[1.0, 1.0, -1.0, 0.5], [2.0, -1.0, -1.2, 0.3], [5.0, 3.0, -0.5, 0.2]])
    cloud = torch.tensor([0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pts, cloud, [2])
    assert torch.isfinite(out["cls"].float()).all()
    for stray in ([0, 1, 2], [0, -1, 1]):
        with pytest.raises(ValueError, match=r"cloud index outside 0\.\.1"):
            model(pts, torch.tensor(stray), [2])
    with pytest.raises(ValueError, match="one integer index per point"):
        model(pts, cloud.float(), [2])


def test_channels_last_detector_computes_the_same_outputs_in_nhwc():
    """The NHWC layout changes where each number sits in memory, not what it is (the order of some sums at most)."""
    from sparsedistill.perception.training import flat_outputs

    frame = simulate_frame(7, SimConfig(SceneConfig(agents=(2, 3)), LidarConfig(rings=16, azimuths=256)))
    points = [frame.points_in_ego(a)[:, :4] for a in range(frame.num_agents)]  # x, y, z, intensity
    pts, cloud = torch.cat(points), torch.cat([torch.full((len(p),), i) for i, p in enumerate(points)])
    torch.manual_seed(0)
    plain = create_model("coop_detector_tiny", reconstruction=True).train()
    nhwc = create_model("coop_detector_tiny", reconstruction=True, channels_last=True).train()
    nhwc.load_state_dict(plain.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.ndim == 4)
    a, b = plain(pts, cloud, [frame.num_agents]), nhwc(pts, cloud, [frame.num_agents])
    assert b["bev"].is_contiguous(memory_format=torch.channels_last) and not a["bev"].is_contiguous(
        memory_format=torch.channels_last)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in (*b["agent_features"], *b["fused_features"]))
    for key in ("cls", "reg", "bev", "recon"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    for x, y in zip(flat_outputs(b), flat_outputs(a)):  # the anchors' order does not follow the layout
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    # gradients: not compared by value (at random weights they are ill-conditioned: this NCHW model in float64 and in
    # float32 differs by up to 38 % in a parameter's gradient), but they reach the same parameters, in NHWC
    (b["cls"].sum() + b["recon"].sum()).backward()
    (a["cls"].sum() + a["recon"].sum()).backward()
    for (name, p), q in zip(nhwc.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and (p.ndim != 4 or p.grad.is_contiguous(memory_format=torch.channels_last)), name
