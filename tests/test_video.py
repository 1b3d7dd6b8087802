"""The video system's pieces: Moving Fashion-MNIST, the video DiT, rectified flow (CPU, small shapes)."""

import pytest
import torch

from sparsedistill.models import create_model


@pytest.fixture(scope="module")
def clips():
    from sparsedistill.data.moving_fmnist import MovingFashionMNIST

    return MovingFashionMNIST.from_split("train", frames=6, size=40, items=2)


def test_moving_fmnist_clips_are_a_function_of_seed_and_index(clips):
    v, y = clips.clips([0, 1, 2, 3], seed=7)
    assert v.shape == (4, 1, 6, 40, 40) and v.min() >= -1 and v.max() <= 1
    again, y2 = clips.clips([2, 0], seed=7)
    assert torch.equal(again[0], v[2]) and torch.equal(again[1], v[0]) and y2.tolist() == [y[2], y[0]]
    assert not torch.equal(clips.clips([0], seed=8)[0][0], v[0])
    # the items move: consecutive frames differ, and every frame shows something
    assert (v[:, :, 1:] != v[:, :, :-1]).any() and (v.amax((1, 3, 4)) > 0).all()


def test_moving_fmnist_items_are_of_the_clip_class(clips):
    from sparsedistill.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist()
    for i in range(5):
        label, rows, _, _ = clips._params(i, seed=0)
        assert (data.train_y[rows] == label).all()
    with pytest.raises(ValueError, match="split must be"):
        type(clips).from_split("valid")


def test_video_dit_shapes_token_order_and_bad_input():
    from sparsedistill.models.video_dit import VideoDiTConfig

    m = create_model("video_dit_fmnist_tiny")
    x = torch.randn(2, 1, 8, 32, 32)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    tokens = m.patchify(torch.arange(8 * 32 * 32, dtype=torch.float32).view(1, 1, 8, 32, 32))
    # token 0..63 of the model order: one 1 x 8 x 8 tile of patches, i.e. one frame's 16 x 16 pixel corner
    first = tokens[0, :64, 0].long()
    frame, row, col = first // 1024, (first % 1024) // 32, first % 32
    assert frame.unique().tolist() == [0] and row.max() < 16 and col.max() < 16
    v = m(x, torch.rand(2), torch.tensor([0, m.null_class]))
    assert v.shape == x.shape
    with pytest.raises(ValueError, match=r"class ids must be integers in 0\.\.9, or 10"):
        m.check_inputs(x, torch.rand(2), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="expected videos"):
        m.check_inputs(torch.randn(2, 1, 7, 32, 32), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="height 30 is not a multiple of the patch size 4"):
        VideoDiTConfig(height=30, patch=(1, 4, 4))
    with pytest.raises(ValueError, match="not tiled by"):
        VideoDiTConfig(frames=16, height=64, width=64, tile=(1, 6, 8))


def test_video_dit_attention_is_swappable():
    from sparsedistill.attention import AdaptiveBlockSparseAttention, ASAConfig

    torch.manual_seed(0)
    m = create_model("video_dit_fmnist_tiny")
    for p in m.parameters():  # adaLN-Zero starts at zero output: give it weights so attention matters
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(1, 1, 8, 32, 32), torch.rand(1), torch.tensor([3])
    dense = m(x, t, y)
    m.eval().set_attention(lambda i: AdaptiveBlockSparseAttention(ASAConfig(block=64, tau=1.0, samples=16), reference=True))
    assert isinstance(m.blocks[1].attention, AdaptiveBlockSparseAttention)
    assert not m.blocks[1].attention.training  # new modules take the model's mode (a sampler's masks are reused)
    assert m.train().set_attention(None).blocks[0].attention.training
    full_mask = m(x, t, y)  # tau = 1 keeps every block: the same function (reference path on the CPU)
    assert torch.allclose(full_mask, dense, atol=1e-4)


def test_rope_3d_rotates_each_axis_by_its_own_position():
    from sparsedistill.attention.rope import apply_rope_3d, rope_3d_tables, split_3d

    assert split_3d(64) == (16, 24, 24) and split_3d(128) == (32, 48, 48)
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [1, 2, 4]])
    cos, sin = rope_3d_tables(coords, 64)
    q = torch.randn(1, 1, 3, 64)
    rq = apply_rope_3d(q, cos, sin)
    assert torch.allclose(rq[..., 0, :], q[..., 0, :])  # position 0: no rotation
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # rotations keep lengths
    # tokens 1 and 2 differ only in the column: the time and row slices rotate alike
    same = torch.randn(64)
    r = apply_rope_3d(same.expand(1, 1, 3, 64).clone(), cos, sin)[0, 0]
    assert torch.allclose(r[1, :40], r[2, :40]) and not torch.allclose(r[1, 40:], r[2, 40:])
    # the one-pass rotation is apply_rope on each axis's slice
    from sparsedistill.attention.rope import apply_rope

    k = torch.randn(2, 3, 3, 64)
    bounds = [0, 16, 40, 64]
    per_slice = torch.cat([apply_rope(k[..., a:b], cos[:, a:b], sin[:, a:b]) for a, b in zip(bounds, bounds[1:])], -1)
    assert torch.allclose(apply_rope_3d(k, cos, sin), per_slice, atol=1e-6)
    # its cached rotation, first built under inference mode (sampling), still serves training (saved for backward)
    from sparsedistill.attention import rope

    rope._ROTATIONS.clear()
    with torch.inference_mode():
        apply_rope_3d(k, cos, sin)
    leaf = k.clone().requires_grad_(True)
    apply_rope_3d(leaf, cos, sin).sum().backward()
    assert leaf.grad is not None


def test_flow_loss_and_euler_sampler():
    from sparsedistill.video import euler_sample, flow_matching_loss, time_grid

    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(time_grid(4, shift=3.0)[1], torch.tensor(0.9))
    with pytest.raises(ValueError, match="at least one"):
        time_grid(0)

    class Exact(torch.nn.Module):  # knows x0: its velocity is (x_t - x0) / t, so one Euler step lands on x0
        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, x, t, y):
            x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1)  # guidance doubles the batch
            return (x - x0) / t.view(-1, 1, 1, 1, 1).clamp(min=1e-6)

    x0 = torch.randn(2, 1, 2, 4, 4)
    noise = torch.randn_like(x0)
    out = euler_sample(Exact(x0), noise, torch.tensor([0, 1]), null_class=10, steps=1, cfg=5.0)
    assert torch.allclose(out, x0, atol=1e-5)  # guidance of two equal velocities is that velocity
    m = create_model("video_dit_fmnist_tiny")
    with pytest.raises(ValueError, match=r"class ids must be integers in 0\.\.9"):
        euler_sample(m, torch.randn(1, 1, 8, 32, 32), torch.tensor([12]), m.null_class, steps=2)
    loss = flow_matching_loss(m, torch.randn(2, 1, 8, 32, 32), torch.tensor([1, 2]), m.null_class)
    loss.backward()
    assert loss.item() > 0 and m.head.weight.grad.abs().sum() > 0


def test_tdm_student_step_with_eta_one_is_the_euler_step_and_rollout_matches_the_sampler():
    from sparsedistill.video import euler_sample
    from sparsedistill.video.tdm import rollout, student_step, student_times

    x, v = torch.randn(2, 1, 2, 4, 4), torch.randn(2, 1, 2, 4, 4)
    t, s = torch.tensor([0.75, 0.75]), torch.tensor([0.5, 0.5])
    x0, nxt = student_step(x, v, t, s, eta=1.0, noise=None)
    assert torch.allclose(nxt, x + (s - t).view(-1, 1, 1, 1, 1) * v, atol=1e-6)
    assert torch.allclose(x0, x - 0.75 * v)
    torch.manual_seed(0)
    m = create_model("video_dit_fmnist_tiny")
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    noise, y = torch.randn(1, 1, 8, 32, 32), torch.tensor([4])
    inputs, out = rollout(m, noise, y, steps=3, eta=1.0)
    assert len(inputs) == 3 and torch.equal(inputs[0], noise)
    ref = euler_sample(m, noise, y, m.null_class, cfg=1.0, times=student_times(3))
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="pass it"):
        student_step(x, v, t, s, eta=0.9, noise=None)


def test_tdm_renoise_reaches_times_between_the_interval_and_t_max():
    from sparsedistill.video.tdm import renoise

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 1, 1, 8, 8, generator=g), torch.randn(64, 1, 1, 8, 8, generator=g)
    low = torch.full((64,), 0.25)
    x_t, t = renoise(x0, eps, low, eta=0.9, t_max=0.98, generator=g)
    assert (t >= 0.25).all() and (t <= 0.98).all() and not x_t.requires_grad
    # the marginal of x_t given x0 is the flow's: mean (1 - t) x0, variance t^2
    resid = (x_t - (1 - t.view(-1, 1, 1, 1, 1)) * x0) / t.view(-1, 1, 1, 1, 1)
    assert abs(resid.std().item() - 1.0) < 0.05


def test_tdm_generator_gradient_vanishes_when_fake_equals_teacher_and_follows_their_gap():
    from sparsedistill.video.tdm import fake_score_loss, generator_loss

    class Const(torch.nn.Module):  # velocity that denoises everything toward a fixed x0
        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, x, t, y):
            return (x - self.x0.expand_as(x)) / t.view(-1, 1, 1, 1, 1)

    shape = (2, 1, 1, 4, 4)
    x0 = torch.zeros(shape, requires_grad=True)
    x_t, t, y = torch.randn(shape), torch.tensor([0.5, 0.7]), torch.tensor([0, 1])
    same = Const(torch.ones(1, 1, 1, 4, 4))
    loss, _ = generator_loss(x0, x_t, t, y, same, same, null_class=10, cfg=1.0, huber_c=1e-3)
    (g,) = torch.autograd.grad(loss, x0)
    assert g.abs().max() < 1e-6
    teacher, fake = Const(torch.ones(1, 1, 1, 4, 4)), Const(torch.zeros(1, 1, 1, 4, 4))
    loss, metrics = generator_loss(x0, x_t, t, y, teacher, fake, null_class=10, cfg=1.0, huber_c=1e-3)
    (g,) = torch.autograd.grad(loss, x0)
    assert (g < 0).all() and abs(metrics["real_minus_fake"].item() - 1.0) < 1e-5  # descent moves x0 toward the teacher
    assert fake_score_loss(Const(x0.detach()), x_t, t, y, x0) < 1e-10


def test_tdm_generator_loss_guides_the_teacher_and_scales_huber_like_blade():
    from sparsedistill.video.tdm import generator_loss, renoise

    class ByClass(torch.nn.Module):  # denoises toward x0 = class id (the null class 10 toward 0)
        def forward(self, x, t, y):
            target = torch.where(y == 10, 0.0, y.float()).view(-1, 1, 1, 1, 1)
            return (x - target) / t.view(-1, 1, 1, 1, 1)

    shape = (1, 1, 1, 4, 4)
    x0 = torch.zeros(shape, requires_grad=True)
    x_t, t, y = torch.randn(shape), torch.tensor([0.5]), torch.tensor([1])
    fake = ByClass()
    _, m1 = generator_loss(x0, x_t, t, torch.tensor([0]), ByClass(), fake, 10, cfg=3.0, huber_c=1e-3)
    assert m1["real_minus_fake"].item() < 1e-6  # class 0 = the null class's x0: guidance changes nothing
    _, m3 = generator_loss(x0, x_t, t, y, ByClass(), lambda x, t, y: (x - 0.0) / t.view(-1, 1, 1, 1, 1), 10, cfg=3.0,
                           huber_c=1e-3)
    assert abs(m3["real_minus_fake"].item() - 3.0) < 1e-5  # null 0 + 3 x (class 1 - null 0) = 3
    # BLADE's constant for Wan's latent (16 x 21 x 60 x 104): 1e-3 / 128 * sqrt(elements) = 0.0113
    big = torch.zeros(1, 16, 21, 60, 104)
    zero_fake = lambda x, t, y: x / t.view(-1, 1, 1, 1, 1)  # noqa: E731  (x0 = 0)
    loss, _ = generator_loss(big, big, torch.tensor([0.5]), y, ByClass(), zero_fake, 10, cfg=1.0, huber_c=1e-3)
    c = 1e-3 * big[0].numel() ** 0.5 / 128  # every element 1 away from its target: sqrt(1 + c^2) - c
    assert abs(c - 0.0113) < 1e-4 and abs(loss.item() - ((1 + c * c) ** 0.5 - c)) < 1e-5
    # re-noising never reaches t = 0 (the fake score's target divides by t)
    _, tt = renoise(torch.zeros(4096, 1, 1, 1, 1), torch.zeros(4096, 1, 1, 1, 1), torch.zeros(4096), 1.0, 0.98)
    assert tt.min() >= 1e-3


@pytest.mark.parametrize("schedule", [{}, {"ema": 0.5, "lr_schedule": "cosine", "warmup": 1}])
def test_train_tdm_resumes_exactly_and_moves_the_student(tmp_path, schedule):
    import copy

    from sparsedistill.runs import Run
    from sparsedistill.video.tdm import TDMTrainConfig, train_tdm

    class Stop(Exception):
        pass

    torch.manual_seed(0)
    teacher = create_model("video_dit_fmnist_tiny", depth=1, dim=64, heads=1)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cfg = TDMTrainConfig(steps=2, iterations=4, batch_size=2, checkpoint_every=2, log_every=1, cfg=3.0, **schedule)
    fresh = lambda: (copy.deepcopy(teacher), copy.deepcopy(teacher))  # noqa: E731
    s_ref, f_ref = fresh()
    train_tdm(s_ref, f_ref, teacher, 10, cfg, job="tdm", run=Run(tmp_path / "a", cfg), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(s_ref.parameters(), teacher.parameters()))

    s, f = fresh()
    run = Run(tmp_path / "b", cfg)
    calls = [0]
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):  # the 6th optimizer step: iteration 3's fake update (after the iteration-2 checkpoint)
        calls[0] += 1
        if calls[0] == 6:
            raise Stop
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = dying_step
    try:
        with pytest.raises(Stop):
            train_tdm(s, f, teacher, 10, cfg, job="tdm", run=run, progress=False)
    finally:
        torch.optim.AdamW.step = real_step
    s, f = fresh()
    train_tdm(s, f, teacher, 10, cfg, job="tdm", run=Run(tmp_path / "b", cfg, resume=True), progress=False)
    for a, b in zip(s.parameters(), s_ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_tdm_student_learning_rate_schedule_and_moving_average(tmp_path):
    import copy

    from sparsedistill.runs import Run
    from sparsedistill.video.tdm import TDMTrainConfig, lr_factor, train_tdm, trained_student_state

    cos = TDMTrainConfig(iterations=10, warmup=2, lr_schedule="cosine")
    assert [round(lr_factor(i, cos), 4) for i in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.0381]
    assert [lr_factor(i, TDMTrainConfig(iterations=10)) for i in (0, 9)] == [1.0, 1.0]  # the default: constant
    torch.manual_seed(0)
    teacher = create_model("video_dit_fmnist_tiny", depth=1, dim=64, heads=1)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def trained(name: str, **over) -> tuple[torch.nn.Module, dict]:
        cfg = TDMTrainConfig(**{"steps": 2, "iterations": 1, "batch_size": 2, "log_every": 1, "cfg": 3.0, "lr": 1e-3,
                                **over})
        run = Run(tmp_path / name, cfg)
        s = train_tdm(copy.deepcopy(teacher), copy.deepcopy(teacher), teacher, 10, cfg, job="tdm", run=run, progress=False)
        return s, run.load_checkpoint("tdm")

    plain, plain_state = trained("plain")
    averaged, state = trained("ema", ema=0.9)
    # one update with the decay warmed up to min(0.9, 1 / 10): the average is 0.1 start + 0.9 trained weights (the
    # trained weights are the plain run's: the average does not feed back); the checkpoint keeps the raw weights
    for a, t, w in zip(averaged.state_dict().values(), teacher.state_dict().values(), plain.state_dict().values()):
        assert torch.allclose(a, 0.1 * t + 0.9 * w, atol=1e-7)
    assert any(not torch.equal(a, w) for a, w in zip(averaged.parameters(), plain.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(averaged.state_dict().values(), trained_student_state(state).values()))
    assert all(torch.equal(a, b) for a, b in zip(state["student"].values(), plain_state["student"].values()))
    assert "ema" in state and "ema" not in plain_state
    _, cosine = trained("cosine", iterations=3, warmup=1, lr_schedule="cosine")
    assert cosine["opt_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5)  # the last iteration's, halfway down
    with pytest.raises(ValueError, match="decay is in"):
        train_tdm(teacher, teacher, teacher, 10, TDMTrainConfig(ema=1.0), job="x", progress=False)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_tdm(teacher, teacher, teacher, 10, TDMTrainConfig(lr_schedule="linear"), job="x", progress=False)


def test_video_metrics_on_real_clips_and_their_corruptions(clips):
    from sparsedistill.video.metrics import (FrameClassifier, bootstrap_interval, class_accuracy, frame_features,
                                             frechet_distance, frechet_interval, label_consistency, motion)

    torch.manual_seed(0)
    clf = FrameClassifier()
    real, y = clips.clips(range(16), seed=0)
    other, _ = clips.clips(range(16, 32), seed=0)
    noise = torch.rand_like(real) * 2 - 1
    # the statistic: ~0 for a set against itself, larger for noise than for other real clips
    f_real, f_other, f_noise = (frame_features(clf, v) for v in (real, other, noise))
    assert f_real.shape == (16, 6, 128)
    assert abs(frechet_distance(f_real, f_real)) < 1e-6
    assert frechet_distance(f_noise, f_real) > frechet_distance(f_other, f_real)
    lo, hi = frechet_interval(f_other, f_real, rounds=40)
    assert lo <= frechet_distance(f_other, f_real) <= hi
    # strong inflation (200 videos of 16 nearly identical frames, 64-d): the raw resampled distances all lie above
    # the full-sample value; the bias-corrected interval holds it
    g = torch.Generator().manual_seed(1)
    per_video = lambda: (torch.randn(200, 1, 64, generator=g, dtype=torch.float64)  # noqa: E731
                         + 0.05 * torch.randn(200, 16, 64, generator=g, dtype=torch.float64))
    gen, ref = per_video() + 0.3, per_video()
    full = frechet_distance(gen, ref)
    lo, hi = frechet_interval(gen, ref, rounds=60)
    resampled = frechet_distance(gen[torch.randint(200, (200,), generator=g)], ref)
    assert resampled > full and lo <= full <= hi
    # the statistic is torchmetrics' FID (non-symmetric eigenvalues) on the same features
    FrechetInceptionDistance = pytest.importorskip("torchmetrics.image.fid").FrechetInceptionDistance

    class Given(torch.nn.Module):
        num_features = 128

        def forward(self, x):
            return x

    fid = FrechetInceptionDistance(feature=Given()).set_dtype(torch.float64)
    fid.update(f_real.reshape(-1, 128), real=True)
    fid.update(f_noise.reshape(-1, 128), real=False)
    assert abs(float(fid.compute()) - frechet_distance(f_noise, f_real)) < 1e-6 * max(1.0, float(fid.compute()))
    acc = class_accuracy(clf, real, y)
    assert acc.shape == (16,) and ((acc >= 0) & (acc <= 1)).all()
    frozen = real[:, :, :1].expand_as(real)  # a still video: no motion, one label throughout
    assert (motion(frozen) == 0).all() and (motion(real) > 0).all()
    assert (label_consistency(clf, frozen) == 1).all()
    lo, hi = bootstrap_interval(torch.tensor([0.0, 1.0] * 50))
    assert 0.35 < lo < 0.5 < hi < 0.65


def _tiny_recipe_config(**over):
    from sparsedistill.config import load_config
    from sparsedistill.recipes.video_blade import VideoBladeConfig

    sets = ["teacher.steps=6", "classifier.steps=4", "students.tdm.iterations=2", "eval.videos=4", "eval.batch=4",
            "eval.bootstrap=20", "sampling.steps=4", *[f"{k}={v}" for k, v in over.items()]]
    return load_config(VideoBladeConfig, "short", sets, recipe="video")


def test_video_recipe_runs_resumes_and_reports(tmp_path):
    import json

    from sparsedistill.cli import main
    from sparsedistill.recipes.video_blade import run_video_blade

    cfg = _tiny_recipe_config()
    report = run_video_blade(cfg, tmp_path / "run", progress=False)
    res = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())
    assert list(res["models"]) == ["teacher-4", "teacher-k2", "teacher-k2-cfg1", "tdm-k2", "tdm+asa-k2", "tdm-asa-k2"]
    for name, row in res["models"].items():
        assert 0 <= row["class_accuracy"] <= 1 and row["fd_real"] >= 0 and row["fd_real_ci"][1] > 0
        assert (row["attention_kept"] is None) == ("asa" not in name)
        assert (tmp_path / "run" / "samples" / f"{name}-s0.gif").exists()
    assert res["models"]["tdm-asa-k2"]["attention_kept"] < 0.5  # max_keep 0.17 of the blocks, plus diagonals
    assert res["models"]["teacher-k2"]["nfe"] == 4 and res["models"]["tdm-k2"]["nfe"] == 2
    assert res["models"]["teacher-k2-cfg1"]["nfe"] == 2 and res["models"]["teacher-k2-cfg1"]["cfg"] == 1.0
    # students sample with the eta they were trained with; the teacher by Euler steps
    assert res["models"]["tdm-k2"]["eta"] == cfg.students.tdm.eta and res["models"]["teacher-k2"]["eta"] == 1.0
    # every student is exported in bf16 and loads into a fresh model (what `video sample` and a GPU run hand back)
    from safetensors.torch import load_file

    for job in ("tdm-k2-s0", "tdm-asa-k2-s0"):
        state = load_file(str(tmp_path / "run" / "exports" / f"{job}.safetensors"))
        assert all(v.dtype == torch.bfloat16 for v in state.values())
        create_model(cfg.model.name).load_state_dict({k: v.float() for k, v in state.items()})
    text = report.read_text()
    assert "| `tdm-asa-k2` | TDM + ASA (b) |" in text and "![quality](quality-s0.png)" in text
    # resuming a finished run retrains nothing; the report command rewrites the report from the results
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    run_video_blade(cfg, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == logged
    report.unlink()
    assert main(["video", "report", str(tmp_path / "run")]) == 0 and report.exists()
    # every job is a function of its config alone: the ASA student and the evaluation redone after the jobs
    # before them were loaded (not trained) in this process come out the same to the last digit
    from _helpers import redo_jobs

    before, after = redo_jobs(tmp_path / "run", ["tdm-asa-k2-s0", "eval-s0"],
                              lambda: run_video_blade(cfg, tmp_path / "run", resume=True, progress=False))
    assert after == before
    # a run whose models' checkpoints stayed on a GPU machine is evaluated from the bf16 exports that came back (the
    # frame classifier, trained on the CPU, travelled there with the run)
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "back", ignore=lambda d, names: [
        n for n in names if d.endswith("checkpoints") and n != "classifier.pt"])
    (tmp_path / "back" / "results" / "eval-s0.json").unlink()
    logged = (tmp_path / "back" / "metrics.jsonl").read_text()
    run_video_blade(cfg, tmp_path / "back", resume=True, progress=False)
    back = json.loads((tmp_path / "back" / "results" / "eval-s0.json").read_text())
    assert list(back["models"]) == list(res["models"]) and not (tmp_path / "back" / "checkpoints" / "teacher-s0.pt").exists()
    assert (tmp_path / "back" / "metrics.jsonl").read_text() == logged  # nothing retrained
    for name, row in back["models"].items():  # bf16 weights: near the checkpoints' figures, not equal
        assert abs(row["fd_real"] - after["eval-s0"]["models"][name]["fd_real"]) <= 0.1 * row["fd_real"] + 1.0, name
    # the exported teacher starts another run; a checkpoint of another architecture is refused by name
    export = tmp_path / "run" / "exports" / "teacher-s0-ema.safetensors"
    assert export.exists()
    from sparsedistill.recipes.video_blade import VideoBlade
    from sparsedistill.runs import Run

    wrong = VideoBlade(_tiny_recipe_config(**{"teacher.init": f'"{export}"', "model.name": '"video_dit_fmnist"'}),
                       Run(tmp_path / "c", cfg), progress=False)
    with pytest.raises(ValueError, match="another architecture"):
        wrong.teacher(0)


def test_video_recipe_tells_the_students_apart(tmp_path, monkeypatch):
    """With a teacher whose attention matters (random weights, not a 6-step one still near adaLN-Zero's identity),
    switching ASA on untrained (c) changes the samples of the dense student (a)."""
    import json

    from sparsedistill.data.moving_fmnist import MovingFashionMNIST
    from sparsedistill.models.safetensors_io import save_bf16
    from sparsedistill.recipes.video_blade import VideoBlade, run_video_blade
    from sparsedistill.runs import Run

    torch.manual_seed(0)
    teacher = create_model("video_dit_fmnist_tiny")
    with torch.no_grad():
        for p in teacher.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.05)
    save_bf16(teacher, tmp_path / "teacher-s0.safetensors")
    cfg = _tiny_recipe_config(**{"teacher.init": f'"{tmp_path}/teacher-s{{seed}}.safetensors"', "students.tdm.iterations": 1,
                                 "eval.asa_reuse": "[2]"})
    # from an exported teacher the students' distillation is data-free: it runs where the data is not (a GPU
    # machine that got the teacher but not Fashion-MNIST yet)
    def no_data(*a, **k):
        raise AssertionError("the data was read")

    with monkeypatch.context() as m:
        m.setattr(MovingFashionMNIST, "from_split", classmethod(no_data))
        blade = VideoBlade(cfg, Run(tmp_path / "data-free", cfg), progress=False)
        blade.student(0, "tdm-asa", 2, blade.teacher(0))
    run_video_blade(cfg, tmp_path / "run", progress=False)
    res = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())["models"]
    a, c = res["tdm-k2"], res["tdm+asa-k2"]
    assert a["fd_teacher"] != c["fd_teacher"] and c["attention_kept"] < 0.5
    assert res["teacher-4"]["fd_teacher"] is None  # no distance of the teacher to itself
    # the joint student sampled again with each mask serving two steps: a row of its own, right after (b)
    names = list(res)
    assert names[names.index("tdm-asa-k2") + 1] == "tdm-asa-k2-reuse2"
    reused = res["tdm-asa-k2-reuse2"]
    assert reused["what"].startswith("TDM + ASA (b), each mask serving 2 steps") and reused["attention_kept"] < 0.5
    init = json.loads((tmp_path / "run" / "results" / "teacher-s0.json").read_text())
    assert init["init"].endswith("teacher-s0.safetensors") and len(init["sha256"]) == 64


def test_video_recipe_compares_arms_trained_by_separate_processes(tmp_path, capsys):
    """Arms of students.arms train as separate ``--jobs`` calls on one run directory, then one evaluation covers
    them all: each arm's settings reach its trainer (lr = 0 leaves the student the teacher)."""
    import json

    from safetensors.torch import load_file

    from sparsedistill.cli import main
    from sparsedistill.models.safetensors_io import save_bf16

    torch.manual_seed(0)
    save_bf16(create_model("video_dit_fmnist_tiny"), tmp_path / "teacher-s0.safetensors")
    run = tmp_path / "run"
    sets = ["teacher.steps=6", "classifier.steps=4", "students.tdm.iterations=1", "eval.videos=4", "eval.batch=4",
            "eval.bootstrap=20", "sampling.steps=4", 'students.variants=["tdm"]',
            f'teacher.init="{tmp_path}/teacher-s{{seed}}.safetensors"', "students.arms.base={}",
            "students.arms.frozen.tdm.lr=0.0", "students.arms.frozen.tdm.fake_lr=0.0"]
    cli = ["video", "run", "--config", "short", "--run-dir", str(run), "--no-progress"]
    for s in sets:
        cli += ["--set", s]
    assert main([*cli, "--jobs", "tdm-k2"]) != 0
    assert "unknown jobs ['tdm-k2']; this config's jobs are ['teacher', 'classifier', 'tdm-k2-base'" in capsys.readouterr().err
    assert main([*cli, "--jobs", "tdm-k2-frozen"]) == 0
    assert sorted(p.name for p in (run / "results").iterdir()) == ["tdm-k2-frozen-s0.json", "teacher-s0.json"]
    teacher = load_file(str(tmp_path / "teacher-s0.safetensors"))
    frozen = load_file(str(run / "exports" / "tdm-k2-frozen-s0.safetensors"))
    assert all(torch.equal(frozen[k], teacher[k]) for k in teacher)
    assert main([*cli, "--resume"]) == 0  # trains the other arm and the classifier, then evaluates every arm
    base = load_file(str(run / "exports" / "tdm-k2-base-s0.safetensors"))
    assert any(not torch.equal(base[k], teacher[k]) for k in teacher)
    res = json.loads((run / "results" / "eval-s0.json").read_text())["models"]
    assert list(res) == ["teacher-4", "teacher-k2", "teacher-k2-cfg1", "tdm-k2-base", "tdm+asa-k2-base",
                         "tdm-k2-frozen", "tdm+asa-k2-frozen"]
    assert res["tdm-k2-frozen"]["what"] == "TDM dense (a), arm frozen"


def test_video_recipe_rejects_bad_configs(tmp_path):
    from sparsedistill.recipes.video_blade import validate

    with pytest.raises(ValueError, match="between 1 and the teacher's 4 sampling steps"):
        validate(_tiny_recipe_config(**{"students.steps": "[8]"}))
    with pytest.raises(ValueError, match="unknown student variants"):
        validate(_tiny_recipe_config(**{"students.variants": '["tdm-lora"]'}))
    with pytest.raises(ValueError, match="not a video DiT"):
        validate(_tiny_recipe_config(**{"model.name": '"mlp"'}))
    with pytest.raises(ValueError, match="unknown model"):
        validate(_tiny_recipe_config(**{"model.name": '"video_dit_huge"'}))
    (tmp_path / "t.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"write \{seed\} in the path"):
        validate(_tiny_recipe_config(**{"seeds": "[0, 1]", "teacher.init": f'"{tmp_path}/t.safetensors"'}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate(_tiny_recipe_config(**{"teacher.init": f'"{tmp_path}/missing.safetensors"'}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lrr'\] in \[students.arms.x.tdm\]"):
        validate(_tiny_recipe_config(**{"students.arms.x.tdm.lrr": "1.0"}))
    with pytest.raises(ValueError, match="arm name 'X-1'"):
        validate(_tiny_recipe_config(**{"students.arms.X-1": "{}"}))
    with pytest.raises(ValueError, match=r"K=9 \(students.arms.long\)"):
        validate(_tiny_recipe_config(**{"students.arms.long.steps": "[9]"}))


def test_efficientnet_lite0_recognises_real_photos():
    """The ImageNet weights load into our model: the opencv-doc photos land on their ImageNet classes."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    data = Path("/usr/share/doc/opencv-doc/examples/data")
    if not (data / "baboon.jpg").exists():
        pytest.skip("needs Debian's opencv-doc (make setup installs it)")
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    images = [np.asarray(Image.open(data / f).convert("RGB").resize((224, 224))) for f in ("baboon.jpg", "orange.jpg")]
    x = (torch.from_numpy(np.stack(images).copy()).permute(0, 3, 1, 2).float() - 127.5) / 128
    with torch.no_grad():
        top = model(x).argmax(-1).tolist()
    assert top == [372, 950]  # ImageNet's "baboon" and "orange"


def test_video_recipe_under_torchrun_two_processes(tmp_path):
    """Teacher and students train data-parallel (gloo, CPU) with the same command; rank 0 alone evaluates."""
    import json
    import subprocess
    import sys

    from sparsedistill.models.safetensors_io import save_bf16

    save_bf16(create_model("video_dit_fmnist_tiny"), tmp_path / "init-s0.safetensors")
    sets = ["teacher.steps=4", "classifier.steps=2", "students.tdm.iterations=2", "eval.videos=4", "eval.batch=4",
            "eval.bootstrap=20", "sampling.steps=4", "students.variants=[\"tdm\"]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedistill",
           "video", "run", "--config", "short", "--run-dir", str(tmp_path / "run"), "--no-progress",
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())
    assert list(res["models"]) == ["teacher-4", "teacher-k2", "teacher-k2-cfg1", "tdm-k2", "tdm+asa-k2"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["job"] == "tdm-k2-s0"]
    assert steps == [1, 2]  # logged once (rank 0), reduced over both ranks
    # a teacher from a file: rank 0 alone records it (ranks used to race on that result's barrier)
    cmd[cmd.index(str(tmp_path / "run"))] = str(tmp_path / "run-init")
    cmd += ["--set", f'teacher.init="{tmp_path}/init-s{{seed}}.safetensors"']
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "run-init" / "results" / "teacher-s0.json").read_text())["init"].endswith("init-s0.safetensors")


def test_video_dit_with_asa_compiles_around_the_attention():
    """torch.compile of a DiT with ASA runs (ASA stays eager) and gives the eager output; the kernels on a GPU."""
    from sparsedistill.attention import AdaptiveBlockSparseAttention, ASAConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = create_model("video_dit_fmnist_tiny")
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m = m.to(dev).eval().set_attention(lambda i: AdaptiveBlockSparseAttention(
        ASAConfig(block=64, tau=0.9, max_keep=0.5, samples=16), reference=dev == "cpu"))
    x, t, y = torch.randn(2, 1, 8, 32, 32, device=dev), torch.rand(2, device=dev), torch.tensor([3, 7], device=dev)
    with torch.no_grad():
        eager = m(x, t, y)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(m, dynamic=False)(x, t, y)
        except Exception as e:  # noqa: BLE001
            if dev == "cpu" and "compiler" in str(e).lower():  # no C++ toolchain for Inductor here
                pytest.skip(f"Inductor cannot build CPU kernels here: {e}")
            raise
    assert torch.allclose(compiled, eager, atol=1e-3, rtol=1e-3)
    # ASA itself stays out of the graphs (Inductor failed on its mask kernel): the graphs break around it
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x, t, y)
    reasons = [r.reason for r in explained.break_reasons]
    assert any("torch.compiler.disable" in r and "AdaptiveBlockSparseAttention.forward" in r for r in reasons)


def test_train_tdm_updates_the_fake_score_as_often_as_asked(tmp_path):
    import copy

    from sparsedistill.runs import Run
    from sparsedistill.video.tdm import TDMTrainConfig, train_tdm

    torch.manual_seed(0)
    teacher = create_model("video_dit_fmnist_tiny", depth=1, dim=64, heads=1)
    cfg = TDMTrainConfig(steps=2, iterations=2, batch_size=2, checkpoint_every=2, fake_updates=3)
    run = Run(tmp_path / "r", cfg)
    train_tdm(copy.deepcopy(teacher), copy.deepcopy(teacher), teacher, 10, cfg, job="tdm", run=run, progress=False)
    state = run.load_checkpoint("tdm")
    steps = lambda opt: {float(s["step"]) for s in opt["state"].values()}  # noqa: E731
    assert steps(state["opt_f"]) == {6.0} and steps(state["opt_g"]) == {2.0}
    with pytest.raises(ValueError, match="at least one update"):
        cfg.fake_updates = 0
        train_tdm(copy.deepcopy(teacher), copy.deepcopy(teacher), teacher, 10, cfg, job="x", progress=False)


def test_video_sample_draws_a_strip_and_a_gif_from_an_export(tmp_path, capsys):
    from PIL import Image

    from sparsedistill.cli import main
    from sparsedistill.models.safetensors_io import save_bf16

    torch.manual_seed(0)
    model = create_model("video_dit_fmnist_tiny")
    for p in model.parameters():  # adaLN-Zero starts at a zero output: give it weights so samples depend on them
        torch.nn.init.normal_(p, std=0.05)
    save_bf16(model, tmp_path / "m.safetensors")
    args = ["video", "sample", str(tmp_path / "m.safetensors"), "--model", "video_dit_fmnist_tiny", "--steps", "2",
            "--classes", "1", "4", "7"]
    assert main([*args, "--student", "--asa", "--out", str(tmp_path / "s")]) == 0
    assert "3 videos of classes [1, 4, 7] by a 2-step student (eta 0.9) with ASA" in capsys.readouterr().out
    strip = Image.open(tmp_path / "s.png")
    assert strip.size == (8 * 32, 3 * 32)  # frames across, videos down
    assert Image.open(tmp_path / "s.gif").n_frames == 8
    # the same seed gives the same samples, another seed others, the student's steps others than the teacher's
    assert main([*args, "--out", str(tmp_path / "a")]) == 0 and main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c1")]) == 0
    assert main([*args, "--student", "--out", str(tmp_path / "st")]) == 0
    a = (tmp_path / "a.png").read_bytes()
    assert a != (tmp_path / "c1.png").read_bytes() and a != (tmp_path / "st.png").read_bytes()
    assert main([*args[:-3], "11", "--out", str(tmp_path / "c")]) == 2
    assert "class ids must be integers in 0..9" in capsys.readouterr().err
    assert main([*args[:3], "--model", "video_dit_fmnist", "--out", str(tmp_path / "d")]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_student_samples_are_a_function_of_the_video_not_of_its_batch():
    """Evaluation's student sampler is the training rollout, with fresh noise drawn per video and step: video i
    comes out the same alone or in a batch, and its fresh noise never repeats its starting noise."""
    from sparsedistill.video.samples import sample_videos, seeded_noise, student_step_noise
    from sparsedistill.video.tdm import rollout

    torch.manual_seed(0)
    m = create_model("video_dit_fmnist_tiny").eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    shape, y = (1, 8, 32, 32), torch.tensor([2, 5, 9])
    noise, fresh = seeded_noise(shape, 3, range(3)), student_step_noise(shape, 3, range(3), 2)
    batch = sample_videos(m, noise, y, 10, 2, student_eta=0.9, fresh_noise=fresh)
    alone = sample_videos(m, noise[1:2], y[1:2], 10, 2, student_eta=0.9,
                          fresh_noise=student_step_noise(shape, 3, [1], 2))
    assert torch.allclose(batch[1:2], alone, atol=1e-5)
    assert torch.equal(batch, rollout(m, noise, y, 2, 0.9, fresh_noise=fresh)[1].float().clamp(-1, 1))
    assert not any(torch.equal(f[i], noise[i]) for f in fresh for i in range(3))
    with pytest.raises(ValueError, match="fresh noise"):
        sample_videos(m, noise, y, 10, 2, student_eta=0.9)


@pytest.mark.parametrize("fake_asa", [True, False])
def test_joint_students_fake_score_runs_asa_or_dense_as_configured(tmp_path, monkeypatch, fake_asa):
    from sparsedistill.attention import AdaptiveBlockSparseAttention
    from sparsedistill.models.video_dit import DenseAttention
    from sparsedistill.recipes import video_blade
    from sparsedistill.runs import Run

    seen = {}

    def capture(student, fake, *a, **k):
        seen["student"] = {type(b.attention) for b in student.blocks}
        seen["fake"] = {type(b.attention) for b in fake.blocks}
        raise RuntimeError("captured")  # the models are all this test needs

    monkeypatch.setattr(video_blade, "train_tdm", capture)
    cfg = _tiny_recipe_config(**{"students.fake_asa": str(fake_asa).lower()})
    blade = video_blade.VideoBlade(cfg, Run(tmp_path / "run", cfg), progress=False)
    with pytest.raises(RuntimeError, match="captured"):
        blade.student(0, "tdm-asa", 2, blade.teacher(0))
    assert seen["student"] == {AdaptiveBlockSparseAttention}  # the student samples sparse either way
    assert seen["fake"] == ({AdaptiveBlockSparseAttention} if fake_asa else {DenseAttention})


def test_report_summarises_each_model_over_the_seeds_that_have_it():
    from sparsedistill.recipes.video_report import over_seeds_rows

    def row(acc, fd, kept=None, fd_teacher=1.0):
        return {"class_accuracy": acc, "fd_real": fd, "fd_teacher": fd_teacher, "fd_real_effnet": 2 * fd,
                "attention_kept": kept}

    results = {0: {"models": {"teacher-50": row(0.9, 10.0, fd_teacher=None), "tdm-asa-k4": row(0.5, 20.0, 0.16)}},
               1: {"models": {"teacher-50": row(0.8, 14.0, fd_teacher=None), "tdm-asa-k4": row(0.7, 40.0, 0.18)}},
               2: {"models": {"tdm-asa-k4": row(0.6, 30.0, 0.17)}}}
    rows = {r[0]: r[1:] for r in over_seeds_rows(results)}
    assert rows["`teacher-50`"] == [2, "85.0 ± 7.1", "12.0 ± 2.8", "—", "24.0 ± 5.7", "dense"]
    assert rows["`tdm-asa-k4`"] == [3, "60.0 ± 10.0", "30.0 ± 10.0", "1.0 ± 0.0", "60.0 ± 20.0", "17.0 %"]
