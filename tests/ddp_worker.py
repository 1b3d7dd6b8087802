"""Trains a tiny sparse student with the library's loop; run alone or under torchrun (see test_distributed)."""

import sys
from pathlib import Path

import torch
from torch import nn

from sparsedistill import distributed as dist
from sparsedistill.config import load_config
from sparsedistill.distill import HintLoss, TrainConfig, forward_kl, train
from sparsedistill.runs import Run
from sparsedistill.weights import MagnitudeSparsifier


def main(out: Path) -> None:
    dist.init(backend="gloo")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5))
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    hint = HintLoss(16, 32)
    sparsifier = MagnitudeSparsifier(0.5)
    sparsifier.step_to(student, 1.0)

    def loss_fn(net, xb):
        feats = net.module[:2](xb) if hasattr(net, "module") else net[:2](xb)
        with torch.no_grad():
            t_feats = teacher[:2](xb)
        kd = forward_kl(net(xb), teacher(xb), 2.0)
        h = hint(feats, t_feats)
        return kd + h, {"kd": kd.detach(), "hint": h.detach()}

    cfg = load_config(TrainConfig, overrides=["steps=30", "batch_size=32", "lr=0.01", "log_every=10", "checkpoint_every=1000"])
    run = Run(out.parent / f"run-{out.stem}", cfg)
    train(student, loss_fn, lambda rows: x[rows], len(x), cfg, job="tiny", run=run, seed=3,
          enforce=sparsifier.enforce, extra_params=list(hint.parameters()), progress=False)
    if dist.is_main():
        torch.save({"student": student.state_dict(), "hint": hint.state_dict()}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
