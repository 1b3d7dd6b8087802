"""Trains document vectors on the FLOPS term alone; run alone or under torchrun (see test_retrieval.py)."""

import sys
from pathlib import Path

import torch
from torch import nn

from sparsedistill import distributed as dist
from sparsedistill.config import load_config
from sparsedistill.distill import TrainConfig, train
from sparsedistill.retrieval import flops_loss


def main(out: Path, across_ranks: bool) -> None:
    dist.init(backend="gloo")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    idf = torch.rand(40, generator=g) * 5
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 40), nn.ReLU())  # stands in for SPLADE: (batch, vocab) >= 0

    def loss_fn(net, xb):
        fl = flops_loss(net(xb), idf, across_ranks=across_ranks)
        return fl, {"flops": fl.detach()}

    cfg = load_config(TrainConfig, overrides=["steps=8", "batch_size=16", "lr=0.05", "log_every=100", "checkpoint_every=1000",
                                              "grad_clip=0"])
    train(encoder, loss_fn, lambda rows: x[rows], len(x), cfg, job="flops", run=None, seed=1, progress=False)
    if dist.is_main():
        torch.save(encoder.state_dict(), out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), across_ranks=sys.argv[2] == "global")
