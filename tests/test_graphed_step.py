"""The CUDA-graphed training step (``TrainConfig.cuda_graph``) against the eager loop, on a GPU."""

import pytest
import torch
from torch import nn

from sparsedistill.distill import TrainConfig, train
from sparsedistill.runs import Run

from _helpers import Stop, crash_after

pytestmark = pytest.mark.gpu


def _setup(dropout: float = 0.0):
    torch.manual_seed(0)
    x, y = torch.randn(512, 32, device="cuda"), torch.randint(0, 5, (512,), device="cuda")
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(dropout), nn.Linear(64, 5)).cuda()
    loss = lambda net, b: (nn.functional.cross_entropy(net(b[0]), b[1]), {"logit_mean": net(b[0]).mean().detach()})  # noqa: E731
    return x, y, model, loss


def _masked(model):
    mask = (torch.arange(model[0].weight.numel(), device="cuda") % 4 < 2).view_as(model[0].weight)
    return lambda m: m[0].weight.data.mul_(mask)


def test_graphed_training_matches_eager():
    cfg = TrainConfig(steps=60, batch_size=64, lr=3e-3, weight_decay=0.01, grad_clip=0.5, log_every=20)
    x, y, model, loss = _setup()
    ref = train(model, loss, lambda r: (x[r.cuda()], y[r.cuda()]), 512, cfg, job="e", enforce=_masked(model), progress=False)
    x, y, model, loss = _setup()
    got = train(model, loss, lambda r: (x[r.cuda()], y[r.cuda()]), 512, TrainConfig(**{**vars(cfg), "cuda_graph": True}),
                job="g", enforce=_masked(model), progress=False)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (a - b).abs().max()
    assert float((got[0].weight == 0).float().mean()) >= 0.5  # the masks ran inside the graph


def test_graphed_dropout_draws_as_eager():
    """Dropout inside the graph takes the same random draws as the eager loop (the generator's offsets advance alike)."""
    cfg = TrainConfig(steps=30, batch_size=64, lr=3e-3, log_every=10)
    x, y, model, loss = _setup(dropout=0.3)
    ref = train(model, loss, lambda r: (x[r.cuda()], y[r.cuda()]), 512, cfg, job="e", progress=False)
    x, y, model, loss = _setup(dropout=0.3)
    got = train(model, loss, lambda r: (x[r.cuda()], y[r.cuda()]), 512, TrainConfig(**{**vars(cfg), "cuda_graph": True}),
                job="g", progress=False)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (a - b).abs().max()


def test_graphed_run_resumes_and_logs(tmp_path):
    cfg = TrainConfig(steps=40, batch_size=64, lr=3e-3, log_every=10, checkpoint_every=20, cuda_graph=True)
    x, y, model, loss = _setup()
    ref = train(model, loss, lambda r: (x[r.cuda()], y[r.cuda()]), 512, cfg, job="j", run=Run(tmp_path / "a", cfg), progress=False)
    x, y, model, loss = _setup()
    with pytest.raises(Stop):  # the first half eager, dying after the step-20 checkpoint: a graphed run resumes from it
        train(model, crash_after(loss, 22), lambda r: (x[r.cuda()], y[r.cuda()]), 512, TrainConfig(**{**vars(cfg), "cuda_graph": False}), job="j",
              run=Run(tmp_path / "b", cfg), progress=False)
    _, _, fresh, _ = _setup()
    resumed = train(fresh, loss, lambda r: (x[r.cuda()], y[r.cuda()]), 512, cfg, job="j", run=Run(tmp_path / "b", cfg, resume=True),
                    progress=False)  # steps 20-39 graphed
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    rows = Run(tmp_path / "a", cfg, resume=True).metrics("j")
    assert [r["step"] for r in rows][-1] == 40 and all("logit_mean" in r for r in rows)


def test_graphed_step_errors_name_the_fix():
    x, y, model, _ = _setup()
    sync = lambda net, b: (nn.functional.cross_entropy(net(b[0]), b[1]) * (1 if net(b[0]).sum().item() else 1), {})  # noqa: E731
    with pytest.raises(RuntimeError, match="reads a device value on the host"):  # caught before capture: CUDA stays usable
        train(model, sync, lambda r: (x[r.cuda()], y[r.cuda()]), 512, TrainConfig(steps=3, batch_size=64, cuda_graph=True),
              job="s", progress=False)
    x, y, model, loss = _setup()
    calls = [0]

    def ragged(r):
        calls[0] += 1
        r = r.cuda() if calls[0] < 3 else r[:-1].cuda()
        return x[r], y[r]
    with pytest.raises(ValueError, match="must keep the shape"):
        train(model, loss, ragged, 512, TrainConfig(steps=5, batch_size=64, cuda_graph=True), job="r", progress=False)
