"""Input-channel permutations that keep more weight magnitude under an N:M (2:4) constraint.

N:M pruning keeps the N largest of every M consecutive input channels. Which channels share a
group is arbitrary: permuting the input channels of a Linear (and, to keep the function, the
output channels of the layer that feeds it) changes the groups, and a good permutation keeps
more magnitude. ``search_permutation`` is a greedy swap search in the spirit of NVIDIA apex's
channel permutation: it samples candidate swaps of two channels in different groups, scores
all of them at once, and applies the best improving one, until no sampled swap helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PermutationResult", "kept_magnitude", "search_permutation", "permute_linear_pair"]


@dataclass
class PermutationResult:
    perm: Tensor  # new input-channel order: column j of the permuted weight is column perm[j]
    kept_before: float  # share of |W| that N:M pruning keeps without the permutation
    kept_after: float  # ... and with it
    swaps: int


def kept_magnitude(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Sum of |w| that N:M pruning keeps (the top ``n`` of every ``m`` consecutive inputs)."""
    if weight.shape[1] % m:
        raise ValueError(f"input dimension {weight.shape[1]} is not a multiple of {m}")
    g = weight.detach().abs().float().reshape(weight.shape[0], -1, m)
    return g.topk(n, dim=-1).values.sum()


@torch.no_grad()
def search_permutation(
    weight: Tensor,
    n: int = 2,
    m: int = 4,
    rounds: int = 2000,
    candidates: int = 512,
    patience: int = 50,
    seed: int = 0,
) -> PermutationResult:
    """Greedy swap search for an input-channel permutation of ``weight`` (out, in).

    Runs on ``weight``'s device: on a GPU it does not depend on how many CPU threads the process
    has (``torchrun`` gives each process one). The random draws come from a CPU generator, so a
    seed gives the same candidate swaps on any device.
    """
    W = weight.detach().abs().float()
    out_f, in_f = W.shape
    if in_f % m:
        raise ValueError(f"input dimension {in_f} is not a multiple of {m}")
    dev = W.device
    total = float(W.sum()) or 1.0
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, in_f, (rounds, 2, candidates), generator=g).to(dev)  # one copy, not one per round
    lane = torch.arange(m, device=dev)
    perm = torch.arange(in_f, device=dev)
    P = W.clone()  # columns in the current order
    before = float(kept_magnitude(P, n, m)) / total
    group_kept = P.reshape(out_f, -1, m).topk(n, -1).values.sum((0, 2))  # per group
    swaps, stale = 0, 0
    for r in range(rounds):
        a, b = draws[r]
        ga, gb = a // m, b // m
        # Columns of both groups after the swap: (pairs, out, m) each.
        cols_a = (ga * m).unsqueeze(1) + lane
        cols_b = (gb * m).unsqueeze(1) + lane
        new_a = torch.where(cols_a == a.unsqueeze(1), b.unsqueeze(1), cols_a)
        new_b = torch.where(cols_b == b.unsqueeze(1), a.unsqueeze(1), cols_b)
        kept_a = P[:, new_a].topk(n, -1).values.sum((0, 2))
        kept_b = P[:, new_b].topk(n, -1).values.sum((0, 2))
        gain = kept_a + kept_b - group_kept[ga] - group_kept[gb]
        gain = gain.masked_fill(ga == gb, float("-inf"))  # same-group swaps change nothing (a mask: no device read)
        top, best = gain.max(0)
        top, i, j = torch.stack([top, a[best].to(top.dtype), b[best].to(top.dtype)]).tolist()  # one device read a round
        if top <= 1e-6 * total:
            stale += 1
            if stale >= patience:
                break
            continue
        stale = 0
        i, j = int(i), int(j)
        P[:, [i, j]] = P[:, [j, i]]
        perm[[i, j]] = perm[[j, i]]
        group_kept[ga[best]], group_kept[gb[best]] = kept_a[best], kept_b[best]
        swaps += 1
    after = float(kept_magnitude(W[:, perm], n, m)) / total
    return PermutationResult(perm.cpu(), before, after, swaps)


@torch.no_grad()
def permute_linear_pair(producer: nn.Linear, consumer: nn.Linear, perm: Tensor) -> None:
    """Reorder ``producer``'s outputs and ``consumer``'s inputs by ``perm``, in place.

    The composition ``consumer(act(producer(x)))`` is unchanged for any elementwise ``act``
    (GELU in a ViT MLP), while ``consumer``'s N:M groups change.
    """
    if producer.out_features != consumer.in_features or perm.numel() != consumer.in_features:
        raise ValueError(
            f"producer has {producer.out_features} outputs, consumer {consumer.in_features} inputs, "
            f"permutation {perm.numel()} entries: they must all agree"
        )
    if not torch.equal(perm.sort().values.cpu(), torch.arange(perm.numel())):
        raise ValueError("perm is not a permutation of 0..n-1")
    producer.weight.copy_(producer.weight[perm])
    if producer.bias is not None:
        producer.bias.copy_(producer.bias[perm])
    consumer.weight.copy_(consumer.weight[:, perm])
