"""DSRC's training signals: the painted teacher input, the object mask, the distillation and reconstruction losses."""

import math

import pytest
import torch

from sparsedistill.perception.dsrc import (head_distillation, masked_feature_mse, object_mask, paint_teacher_input,
                                           reconstruction_loss, reconstruction_targets)
from sparsedistill.perception.frames import SimConfig, simulate_frame
from sparsedistill.perception.geometry import points_in_boxes
from sparsedistill.perception.lidar import LidarConfig
from sparsedistill.perception.pillars import BEVGrid
from sparsedistill.perception.scene import SceneConfig

GRID = BEVGrid((-25.6, 25.6), (-12.8, 12.8))


def test_teacher_input_gives_every_agent_the_fleets_car_points():
    frame = simulate_frame(2, SimConfig(SceneConfig(agents=(3, 3)), LidarConfig(rings=32, azimuths=512)))
    pts = [frame.points_in_ego(a)[:, :4] for a in range(frame.num_agents)]
    boxes = frame.boxes_in_ego()
    clouds, objects = paint_teacher_input(pts, boxes)
    merged = torch.cat(pts)
    on_car = points_in_boxes(merged, boxes, 0.1) >= 0
    assert len(objects) == int(on_car.sum()) > 50 and (objects[:, 4] == 1).all()
    for p, c in zip(pts, clouds):
        own_bg = points_in_boxes(p, boxes, 0.1) < 0
        assert c.shape == (int(own_bg.sum()) + len(objects), 5)
        assert torch.equal(c[c[:, 4] == 0][:, :4], p[own_bg]) and torch.equal(c[c[:, 4] == 1], objects)
    # a turned car: a point inside the axis-aligned bounds of its corners but outside the car is background
    car = torch.tensor([[0.0, 0.0, 0.0, 4.0, 1.0, 2.0, math.pi / 4]])
    corner = torch.tensor([[1.2, -1.2, 0.0, 0.5]])  # inside |x|, |y| < 1.77 but 1.7 m sideways of the car's axis
    clouds, objects = paint_teacher_input([corner], car)
    assert len(objects) == 0 and clouds[0][0, 4] == 0


def test_object_mask_marks_the_pillars_of_object_points():
    objects = torch.tensor([[0.1, 0.1, 0.0, 0.5, 1.0], [10.1, -5.1, 0.0, 0.5, 1.0], [0.15, 0.15, 0.0, 0.5, 1.0]])
    m = object_mask(objects, torch.tensor([0, 1, 0]), GRID, 2)
    h, w = GRID.shape
    assert m.shape == (2, h, w) and m.sum() == 2
    assert m[0, 32, 64] == 1 and m[1, int((-5.1 + 12.8) / 0.4), int((10.1 + 25.6) / 0.4)] == 1


def test_masked_mse_counts_masked_cells_only_and_ignores_area():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 8, 16, 16, generator=g), torch.randn(1, 8, 16, 16, generator=g)
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:8, 4:8] = 1
    base = masked_feature_mse(s, t, mask)
    s2 = s.clone()
    s2[..., 12:, 12:] += 5  # outside the mask
    assert torch.allclose(masked_feature_mse(s2, t, mask), base)
    assert masked_feature_mse(t, t, mask) == 0 and masked_feature_mse(s, t, torch.zeros(1, 16, 16)) == 0
    uniform = torch.ones(1, 8, 16, 16)
    small, big = mask.clone(), torch.ones(1, 16, 16)
    assert torch.allclose(masked_feature_mse(uniform, 0 * uniform, small), masked_feature_mse(uniform, 0 * uniform, big))
    s.requires_grad_(True)
    masked_feature_mse(s, t, mask).backward()
    assert s.grad[..., 12:, 12:].abs().sum() == 0 and s.grad[..., 5, 5].abs().sum() > 0


def test_head_distillation_is_zero_at_the_teacher_and_pulls_toward_it():
    g = torch.Generator().manual_seed(1)
    tc, tr = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 14, 4, 4, generator=g)
    assert head_distillation(tc, tr, tc, tr) < 1e-5
    sc = torch.zeros(2, 2, 4, 4, requires_grad=True)
    sr = torch.zeros(2, 14, 4, 4, requires_grad=True)
    loss = head_distillation(sc, sr, tc, tr)
    loss.backward()
    assert loss > 0.01 and (torch.sign(-sc.grad) == torch.sign(tc)).float().mean() > 0.95  # logits move toward the teacher's


def test_reconstruction_targets_and_loss():
    pts = torch.tensor([[0.1, 0.1, -1.0, 0.5], [0.3, 0.3, -1.0, 0.5], [10.1, 5.1, 0.0, 0.2]])
    occ, off = reconstruction_targets(pts, torch.tensor([0, 0, 1]), GRID, 2)
    assert occ.shape == (2, 1, 32 * 2, 64 * 2) and occ.sum() == 2
    assert occ[0, 0, 32, 64] == 1 and torch.allclose(off[0, :, 32, 64], torch.tensor([0.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(off[1, :, 44, 89], torch.tensor([-0.25, 0.25, 0.25]), atol=1e-5)  # pillar centre (10.2, 5.0)
    perfect = torch.cat([occ * 40 - 20, off], 1)
    occ_l, l1 = reconstruction_loss(perfect, occ, off)
    assert occ_l < 1e-4 and l1 == 0
    occ_l, l1 = reconstruction_loss(torch.zeros_like(perfect), occ, off)
    assert occ_l > 0.5 and l1 > 0


def test_masked_mse_keeps_a_small_car_at_coarse_scales():
    mask = torch.zeros(1, 64, 64)
    mask[0, 9, 13] = 1  # one pillar: bilinear resizing to 8 x 8 would skip it at most offsets
    s, t = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    assert masked_feature_mse(s, t, mask) == 1.0


def test_batches_merge_kept_frame_inputs_in_order():
    """``merge`` of kept ``frame_inputs`` (what training reuses) is the batch of those frames, field by field."""
    from sparsedistill.perception.anchors import AnchorConfig, assign_targets, make_anchors
    from sparsedistill.perception.batching import add_reconstruction_targets, collate, frame_inputs, frame_labels, merge

    sim = SimConfig(SceneConfig(agents=(2, 3)), LidarConfig(rings=16, azimuths=256))
    frames = [simulate_frame(s, sim) for s in (3, 4)]
    acfg = AnchorConfig()
    anchors = make_anchors(GRID, acfg).view(-1, 7)
    kept = [frame_inputs(f, GRID, anchors, acfg, teacher=True, reconstruction=True) for f in frames]
    batch = merge([kept[1], kept[0]])  # frames in the batch's order, not the kept order
    order = [frames[1], frames[0]]
    own = [[f.points_in_ego(a)[:, :4] for a in range(f.num_agents)] for f in order]
    gts = [frame_labels(f, o, GRID) for f, o in zip(order, own)]
    assert batch.agents == [f.num_agents for f in order] and all(torch.equal(b, g) for b, g in zip(batch.boxes, gts))
    assert torch.equal(batch.points, torch.cat([p for o in own for p in o]))
    sizes = torch.tensor([len(p) for o in own for p in o])
    assert torch.equal(batch.cloud, torch.repeat_interleave(torch.arange(len(sizes)), sizes))
    merged_frame = torch.repeat_interleave(torch.tensor([0] * len(own[0]) + [1] * len(own[1])), sizes)
    lt = [assign_targets(anchors, g, acfg) for g in gts]
    assert int((batch.labels == 1).sum()) > 0
    assert torch.equal(batch.labels, torch.cat([x for x, _ in lt])) and torch.equal(batch.targets, torch.cat([t for _, t in lt]))
    assert batch.labels.dtype == torch.long and batch.targets.dtype == torch.float32  # torch.equal ignores dtypes
    painted = [paint_teacher_input(o, g) for o, g in zip(own, gts)]
    assert torch.equal(batch.teacher_points, torch.cat([c for clouds, _ in painted for c in clouds]))
    tsizes = torch.tensor([len(c) for clouds, _ in painted for c in clouds])
    assert torch.equal(batch.teacher_cloud, torch.repeat_interleave(torch.arange(len(tsizes)), tsizes))
    # the object mask and reconstruction targets, kept sparse per frame, are the batch's dense ones made from the points
    objects = torch.cat([o for _, o in painted])
    object_frame = torch.repeat_interleave(torch.arange(2), torch.tensor([len(o) for _, o in painted]))
    assert torch.equal(batch.object_mask, object_mask(objects, object_frame, GRID, 2)) and batch.object_mask.sum() > 10
    occ, off = reconstruction_targets(batch.points, merged_frame, GRID, 2)
    assert torch.equal(batch.recon_occupancy, occ) and torch.equal(batch.recon_offset, off) and off.abs().sum() > 0
    # collate is the same path; early fusion merges each frame's agents into one cloud
    again = collate(order, GRID, anchors, acfg, teacher=True)
    assert torch.equal(again.points, batch.points) and torch.equal(again.targets, batch.targets)
    assert again.recon_occupancy is None and torch.equal(again.object_mask, batch.object_mask)
    early = collate(order, GRID, inputs="early", reconstruction=True)
    assert early.agents == [1, 1] and torch.equal(early.cloud, merged_frame) and early.labels is None
    assert torch.equal(early.recon_occupancy, occ)
    # a detector in use makes no labels: the same input, no boxes; nothing that needs labels is made without them
    bare = collate(order, GRID, labels=False)
    assert torch.equal(bare.points, batch.points) and torch.equal(bare.cloud, batch.cloud) and bare.agents == batch.agents
    assert bare.boxes is None and all(len(b) for b in batch.boxes)  # "no labels", not "no cars"
    with pytest.raises(ValueError, match="with and without labels"):
        merge([kept[0], frame_inputs(frames[1], GRID, labels=False)])
    for needs_labels in ({"anchors": anchors, "anchor_cfg": acfg}, {"teacher": True}):
        with pytest.raises(ValueError, match="made from the labels"):
            collate(order, GRID, labels=False, **needs_labels)
    with pytest.raises(ValueError, match="with and without anchor targets"):
        merge([kept[0], frame_inputs(frames[1], GRID)])
    with pytest.raises(ValueError, match="with and without reconstruction targets"):
        merge([kept[0], frame_inputs(frames[1], GRID, anchors, acfg, teacher=True)])
    other = BEVGrid((-12.8, 12.8), (-12.8, 12.8))
    with pytest.raises(ValueError, match="different grids"):
        merge([frame_inputs(f, g, reconstruction=True) for f, g in zip(frames, (GRID, other))])
    with pytest.raises(ValueError, match="collate them on one grid"):
        add_reconstruction_targets(frame_inputs(frames[1], other, teacher=True), GRID)
    with pytest.raises(ValueError, match="at least one frame"):
        merge([])
    # a job merges what it uses of kept inputs that hold more (B0 on inputs collated with the teacher's for later jobs)
    lean = merge(kept, teacher=False, reconstruction=False)
    assert lean.teacher_points is None and lean.object_mask is None and lean.recon_occupancy is None
    assert torch.equal(lean.points, merge(kept).points)
    with pytest.raises(ValueError, match="asked for the teacher's input, which the frames lack"):
        merge([frame_inputs(frames[0], GRID)], teacher=True)
    # kept inputs of a job without reconstruction gain its targets in place, for a later job that needs them
    plain = frame_inputs(frames[1], GRID, anchors, acfg, teacher=True)
    assert add_reconstruction_targets(plain, GRID) is plain
    assert torch.equal(merge([plain, kept[0]]).recon_occupancy, batch.recon_occupancy)


def test_student_loss_is_each_variants_objective():
    from sparsedistill.models import create_model
    from sparsedistill.perception.anchors import make_anchors
    from sparsedistill.perception.batching import collate
    from sparsedistill.perception.training import DSRCWeights, detector_loss, dsrc_loss, student_loss, teacher_points

    torch.manual_seed(0)
    b0, dsrc = create_model("coop_detector_tiny"), create_model("coop_detector_tiny", reconstruction=True)
    teacher = create_model("coop_detector_tiny", in_features=5).eval()
    grid, acfg = b0.cfg.grid, b0.cfg.anchors
    frame = simulate_frame(3, SimConfig(SceneConfig(agents=(2, 3)), LidarConfig(rings=16, azimuths=256)))
    batch = collate([frame], grid, make_anchors(grid, acfg).view(-1, 7), acfg, teacher=True, reconstruction=True)
    loss, parts = student_loss(b0, batch)
    assert torch.equal(loss, detector_loss(b0(batch.points, batch.cloud, batch.agents), batch)[0]) and "head" not in parts
    plain = teacher_points(batch, painted=False)
    assert (plain[:, 4] == 0).all() and torch.equal(plain[:, :4], batch.teacher_points[:, :4]) and batch.teacher_points[:, 4].any()
    _, parts = student_loss(dsrc, batch, teacher, DSRCWeights(), painted=False)
    with torch.no_grad():
        t_out = teacher(plain, batch.teacher_cloud, batch.agents)
    expected = dsrc_loss(dsrc(batch.points, batch.cloud, batch.agents), t_out, batch)[1]
    assert {"head", "occupancy"} <= set(parts) and all(torch.equal(parts[k], expected[k]) for k in parts)
    with pytest.raises(ValueError, match="collate it with teacher=True"):
        teacher_points(collate([frame], grid))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_waits_for_the_gpu_only_where_the_pillars_check_their_input():
    """A whole step (merge of kept inputs, forwards, loss, backward, AdamW) waits for the GPU once per pillar
    encoder (its one read of the checks and the kept count): B0 once, DSRC twice (student and teacher); each
    wait idles the card while the host launches what follows. ``merge`` and the losses alone never wait."""
    from sparsedistill.models import create_model
    from sparsedistill.perception.anchors import make_anchors
    from sparsedistill.perception.batching import frame_inputs, merge
    from sparsedistill.perception.training import DSRCWeights, dsrc_loss, student_loss
    from sparsedistill.timing import host_sync_sites

    sim = SimConfig(SceneConfig(agents=(2, 3)), LidarConfig(rings=16, azimuths=256))
    frames = [simulate_frame(s, sim).to("cuda") for s in (3, 4)]
    teacher = create_model("coop_detector_tiny", in_features=5).cuda().eval()
    for name, expected in (("b0", 1), ("dsrc", 2)):
        model = create_model("coop_detector_tiny", reconstruction=name == "dsrc").cuda()
        grid, acfg = model.cfg.grid, model.cfg.anchors
        anchors = make_anchors(grid, acfg, "cuda").view(-1, 7)
        kept = [frame_inputs(f, grid, anchors, acfg, teacher=name == "dsrc", reconstruction=name == "dsrc") for f in frames]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss, _ = student_loss(model, merge(kept), teacher if name == "dsrc" else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        step()  # the first step allocates the optimiser's state
        torch.cuda.synchronize()
        sites = host_sync_sites(step)
        assert len(sites) == expected, f"{name} waits at {sites}"
        if name == "dsrc":
            batch = merge(kept)
            out = model(batch.points, batch.cloud, batch.agents)
            with torch.no_grad():
                t_out = teacher(batch.teacher_points, batch.teacher_cloud, batch.agents)
            assert host_sync_sites(lambda: (merge(kept), dsrc_loss(out, t_out, batch, DSRCWeights()))) == []
