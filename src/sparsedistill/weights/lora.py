"""Low-rank adapters (LoRA) on chosen Linear layers: how Video-BLADE fine-tunes its students (rank 64 on attention).

``add_lora`` freezes the model and wraps each target Linear as ``base(x) + (alpha / rank) * B(A(x))`` with A
Kaiming-uniform and B zero, so the adapted model starts as the original; ``merge_lora`` folds the adapters back
into plain Linear layers (an export has the original architecture and costs nothing extra at inference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .quant import swap_linears

__all__ = ["LoRALinear", "add_lora", "merge_lora"]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank {rank} must be between 1 and min(in, out) = "
                             f"{min(base.in_features, base.out_features)} for a {base.in_features} -> {base.out_features} layer")
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + self.scale * (self.lora_b.float() @ self.lora_a.float()).to(out.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def add_lora(model: nn.Module, rank: int, targets: Sequence[str], alpha: float | None = None) -> list[str]:
    """Freeze ``model`` and adapt every Linear whose name ends in one of ``targets`` (e.g. ``qkv``, ``proj``);
    returns the adapted names (an error if none matched)."""
    model.requires_grad_(False)
    names = swap_linears(model, lambda n, lin: LoRALinear(lin, rank, alpha) if n.rsplit(".", 1)[-1] in targets else None)
    if not names:
        raise ValueError(f"no Linear layer of {type(model).__name__} is named any of {list(targets)}")
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` of ``model`` by the plain Linear it computes (in place; returns the model)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.merged())
    return model
