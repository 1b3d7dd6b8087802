import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from sparsedistill.config import dump_toml, load_config
from sparsedistill.distill import TrainConfig, train
from sparsedistill.distill.trainer import batch_rows
from sparsedistill.recipes.kd_experiment import ExperimentConfig
from sparsedistill.runs import Run, atomic_write_bytes

from _helpers import Stop, crash_after


@dataclass
class Inner:
    steps: int = 10
    lr: float = 0.1


@dataclass
class Outer:
    name: str = "x"
    seeds: list[int] = field(default_factory=lambda: [0])
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('name = "from-file"\n[inner]\nsteps = 50\n')
    cfg = load_config(Outer, f, ["inner.lr=1", "seeds=[1, 2]", "name=bare-string"])
    assert cfg == Outer("bare-string", [1, 2], Inner(50, 1.0))
    assert isinstance(cfg.inner.lr, float)
    assert "steps = 50" in dump_toml(cfg)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['step'\].*valid keys"):
        load_config(Outer, overrides=["inner.step=5"])
    with pytest.raises(ValueError, match="expects int"):
        load_config(Outer, overrides=["inner.steps=fast"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(Outer, overrides=["inner.steps"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(Outer, "nonexistent")
    with pytest.raises(ValueError, match="expects a list"):
        load_config(Outer, overrides=["seeds=0"])
    with pytest.raises(ValueError, match="expects int"):
        load_config(Outer, overrides=["inner.steps=true"])


def test_shipped_presets_load():
    short = load_config(ExperimentConfig, "short", recipe="kd")
    full = load_config(ExperimentConfig, "full", recipe="kd")
    assert short.seeds == [0] and full.seeds == [0, 1, 2]
    assert full == ExperimentConfig()  # the full preset writes out the defaults


def test_atomic_write_leaves_no_partial_file(tmp_path):
    p = tmp_path / "a" / "f.json"
    atomic_write_bytes(p, b"{}")
    assert p.read_bytes() == b"{}" and [x.name for x in p.parent.iterdir()] == ["f.json"]


def test_run_refuses_to_overwrite_without_resume(tmp_path):
    run = Run(tmp_path / "r", Outer())
    run.save_result("job", {"acc": 1.0})
    assert (tmp_path / "r" / "config.toml").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        Run(tmp_path / "r", Outer())
    assert Run(tmp_path / "r", Outer(), resume=True).result("job") == {"acc": 1.0}
    with pytest.raises(ValueError, match="job name"):
        run.result("../escape")
    with pytest.raises(ValueError, match="config differs"):
        Run(tmp_path / "r", Outer(name="changed"), resume=True)
    # a run started before a key was added resumes while the new key keeps its default, not once it is changed
    saved = tmp_path / "r" / "config.toml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if not line.startswith("name")) + "\n")
    started = saved.read_text()
    assert Run(tmp_path / "r", Outer(), resume=True).result("job") == {"acc": 1.0}
    assert saved.read_text() == started  # the record of what the run started with is kept, not rewritten
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if not line.startswith("name")) + "\n")
    with pytest.raises(ValueError, match="config differs"):
        Run(tmp_path / "r", Outer(name="changed"), resume=True)
    saved.write_text(saved.read_text() + "gone = 1\n")  # a key the code no longer has: not the same config
    with pytest.raises(ValueError, match="config differs"):
        Run(tmp_path / "r", Outer(), resume=True)


def test_a_resumed_run_records_where_it_finished(tmp_path, monkeypatch):
    from sparsedistill.report import command_line

    Run(tmp_path / "r", Outer(), command="sparsedistill x --jobs a")
    monkeypatch.setenv("SPARSEDISTILL_COMMIT", "abc1234")  # resumed elsewhere: another commit (a GPU machine's copy)
    for i in range(25):
        Run(tmp_path / "r", Outer(), resume=True, command=f"sparsedistill x --resume {i}")
    env = Run.open(tmp_path / "r").environment()
    assert env["command"] == "sparsedistill x --jobs a" and env["commit"] != "abc1234"  # the start is kept
    assert len(env["resumes"]) == 20 and env["resumes"][-1]["command"] == "sparsedistill x --resume 24"
    line = command_line(env)
    assert line.startswith("Command: `sparsedistill x --jobs a`") and "Last resumed by `sparsedistill x --resume 24`" in line
    assert "commit abc1234" in line and "resumes" not in line


def test_metrics_keep_the_latest_row_per_step(tmp_path):
    run = Run(tmp_path / "r", Outer())
    run.log("j", 10, loss=2.0)
    run.log("j", 20, loss=1.0)
    run.log("j", 20, loss=0.5)  # replayed after a resume
    assert [(r["step"], r["loss"]) for r in run.metrics("j")] == [(10, 2.0), (20, 0.5)]
    # another process's append caught halfway (processes side by side share metrics.jsonl): the torn line is skipped
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"job": "j", "step": 30, "lo')
    assert [r["step"] for r in run.metrics("j")] == [10, 20]


def test_batch_rows_is_a_shuffle_per_epoch():
    rows = torch.cat([batch_rows(s, 100, 10, seed=1) for s in range(10)])
    assert sorted(rows.tolist()) == list(range(100))
    assert not torch.equal(batch_rows(0, 100, 10, 1), batch_rows(10, 100, 10, 1))
    with pytest.raises(ValueError, match="batch size must be"):
        batch_rows(0, 5, 10, 0)


def _setup():
    torch.manual_seed(0)
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))  # dropout: RNG must resume too
    loss = lambda net, b: (nn.functional.cross_entropy(net(b[0]), b[1]), {})  # noqa: E731
    return x, y, model, loss


def test_resumed_training_matches_uninterrupted(tmp_path):
    x, y, model, loss = _setup()
    cfg = TrainConfig(steps=40, batch_size=20, lr=0.01, log_every=5, checkpoint_every=15)
    ref = train(model, loss, lambda r: (x[r], y[r]), 200, cfg, job="j", run=Run(tmp_path / "a", cfg), progress=False)

    x, y, model, loss = _setup()
    run = Run(tmp_path / "b", cfg)

    with pytest.raises(Stop):  # dies after the step-15 checkpoint
        train(model, crash_after(loss, 22), lambda r: (x[r], y[r]), 200, cfg, job="j", run=run, progress=False)
    assert torch.load(run.checkpoint_path("j"), weights_only=False)["step"] == 15
    _, _, fresh, _ = _setup()
    torch.manual_seed(123)  # the checkpoint, not the caller, decides the RNG state
    resumed = train(fresh, loss, lambda r: (x[r], y[r]), 200, cfg, job="j", run=Run(tmp_path / "b", cfg, resume=True), progress=False)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 40


def test_training_stops_on_non_finite_loss():
    x, y, model, _ = _setup()
    bad = lambda net, b: (net(b[0]).sum() * float("nan"), {})  # noqa: E731
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(model, bad, lambda r: (x[r], y[r]), 200, TrainConfig(steps=5, batch_size=10), job="j", progress=False)


def test_vit_presets_load_and_full_is_the_defaults():
    from sparsedistill.recipes.vit_compress import CompressConfig

    assert load_config(CompressConfig, "full", recipe="vit") == CompressConfig()
    assert load_config(CompressConfig, "short", recipe="vit").model.name == "vit_fmnist_micro"


def test_indexcache_presets_load():
    from sparsedistill.recipes.indexcache import IndexCacheConfig

    assert load_config(IndexCacheConfig, "full", recipe="indexcache") == IndexCacheConfig()
    assert load_config(IndexCacheConfig, "short", recipe="indexcache").data.train_context == 256


def test_cuda_graph_on_the_cpu_trains_as_usual(monkeypatch):
    x, y, model, loss = _setup()
    ref = train(model, loss, lambda r: (x[r], y[r]), 200, TrainConfig(steps=10, batch_size=20, lr=0.01), job="j", progress=False)
    x, y, model, loss = _setup()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, the model left on the CPU: say so
    with pytest.warns(UserWarning, match="cuda_graph needs the model on a CUDA device"):
        got = train(model, loss, lambda r: (x[r], y[r]), 200, TrainConfig(steps=10, batch_size=20, lr=0.01, cuda_graph=True),
                    job="j", progress=False)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


def test_cuda_graph_without_cuda_is_silent(monkeypatch):
    """The ViT recipe turns graphs on by default: a CPU-only machine (the demo, CI) trains eagerly without a word."""
    import warnings

    x, y, model, loss = _setup()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, loss, lambda r: (x[r], y[r]), 200, TrainConfig(steps=3, batch_size=20, lr=0.01, cuda_graph=True),
              job="j", progress=False)


def test_resume_from_a_checkpoint_without_scheduler_state(tmp_path):
    """A graphed run saves no LR-scheduler state (its rate is a function of the step): an eager resume rebuilds it."""
    cfg = TrainConfig(steps=30, batch_size=20, lr=0.01, log_every=5, checkpoint_every=10)
    x, y, model, loss = _setup()
    ref = train(model, loss, lambda r: (x[r], y[r]), 200, cfg, job="j", run=Run(tmp_path / "a", cfg), progress=False)
    # a run that dies after its step-10 checkpoint, whose checkpoint then loses its scheduler state
    x, y, model, loss = _setup()
    short = Run(tmp_path / "c", cfg)
    with pytest.raises(Stop):
        train(model, crash_after(loss, 12), lambda r: (x[r], y[r]), 200, cfg, job="j", run=short, progress=False)
    state = torch.load(short.checkpoint_path("j"), weights_only=False)
    assert state["step"] == 10
    state["scheduler"] = None
    short.save_checkpoint("j", state)
    _, _, fresh, _ = _setup()
    resumed = train(fresh, loss, lambda r: (x[r], y[r]), 200, cfg, job="j", run=Run(tmp_path / "c", cfg, resume=True), progress=False)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_ema_follows_the_weights_and_resumes_exactly(tmp_path):
    import copy

    cfg = TrainConfig(steps=30, batch_size=20, lr=0.01, log_every=5, checkpoint_every=10)
    x, y, model, loss = _setup()
    ema = copy.deepcopy(model)
    start = [p.detach().clone() for p in ema.parameters()]
    train(model, loss, lambda r: (x[r], y[r]), 200, cfg, job="j", run=Run(tmp_path / "a", cfg), ema=ema, ema_decay=0.9, progress=False)
    # an average of the trajectory: moved off the start, not equal to the final weights
    assert all(not torch.equal(e, s) and not torch.equal(e, p) for e, s, p in zip(ema.parameters(), start, model.parameters()))

    x, y, model, loss = _setup()
    ema_b, run = copy.deepcopy(model), Run(tmp_path / "b", cfg)
    with pytest.raises(Stop):
        train(model, crash_after(loss, 15), lambda r: (x[r], y[r]), 200, cfg, job="j", run=run, ema=ema_b, ema_decay=0.9,
              progress=False)
    _, _, fresh, _ = _setup()
    ema_c = copy.deepcopy(fresh)
    train(fresh, loss, lambda r: (x[r], y[r]), 200, cfg, job="j", run=Run(tmp_path / "b", cfg, resume=True), ema=ema_c,
          ema_decay=0.9, progress=False)
    for a, b in zip(ema.parameters(), ema_c.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_environment_names_the_cpu_and_its_vector_isa():
    import torch

    from sparsedistill.runs import environment

    cpu = environment()["cpu"]  # near-ties in CPU float results differ between AVX2 and AVX-512 hosts
    assert cpu.endswith(", " + torch.backends.cpu.get_cpu_capability()) and len(cpu) > len(", AVX2")
