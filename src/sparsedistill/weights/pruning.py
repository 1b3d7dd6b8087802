"""Weight masks and the two weight sparsifiers: unstructured magnitude and N:M (2:4).

A sparsifier moves a model along a sparsity path: ``step_to(model, level)`` with ``level`` in
[0, 1] (0 dense, 1 the final target) prunes more weights, never reviving pruned ones, so the
masks of successive stages are nested (the homotopy path of multi-stage compression).
``enforce(model)`` re-applies the masks after an optimizer step.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "prunable_linears",
    "MaskSet",
    "nm_mask",
    "is_nm_sparse",
    "MagnitudeSparsifier",
    "NMSparsifier",
]

LayerFilter = Callable[[str, nn.Module], bool]


def prunable_linears(model: nn.Module, include: LayerFilter | None = None) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` for every ``nn.Linear`` that ``include`` accepts (all by default)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (include is None or include(name, mod)):
            yield name, mod


class MaskSet:
    """Boolean keep-masks keyed by module name; ``True`` means the weight is kept."""

    def __init__(self, masks: dict[str, Tensor] | None = None) -> None:
        self.masks: dict[str, Tensor] = dict(masks or {})
        self._bound: tuple[nn.Module, list[tuple[Tensor, Tensor]]] | None = None  # (model, [(weight, mask)]) cache

    def __len__(self) -> int:
        return len(self.masks)

    def set(self, name: str, mask: Tensor) -> None:
        self.masks[name] = mask.bool()
        self._bound = None  # rebind weights on the next apply_

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero the pruned weights in place (called after every optimizer step)."""
        if self._bound is None or self._bound[0] is not model:
            modules = dict(model.named_modules())
            self._bound = (model, [(_unwrap(modules, n).weight, m) for n, m in self.masks.items()])
        for w, mask in self._bound[1]:
            if mask.device != w.device:
                mask = mask.to(w.device)
            w.mul_(mask)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.masks.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.masks = {k: v.bool().clone() for k, v in state.items()}
        self._bound = None


def _unwrap(modules: dict[str, nn.Module], name: str) -> nn.Module:
    # Masks are keyed by the bare model's names; DDP prefixes them with "module.".
    mod = modules.get(name) or modules.get(f"module.{name}")
    if mod is None:
        raise KeyError(f"mask refers to module {name!r}, which the model does not have")
    return mod


def nm_mask(weight: Tensor, n: int = 2, m: int = 4, scores: Tensor | None = None) -> Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive weights along the input dim.

    ``scores`` defaults to ``|weight|``. The input dimension must be a multiple of ``m``.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
    if weight.ndim != 2:
        raise ValueError(f"N:M masks are for 2-D (out, in) weights, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"input dimension {in_f} is not a multiple of {m}; pad the layer or exclude it from {n}:{m} pruning")
    s = (weight.abs() if scores is None else scores).reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(-1, s.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def is_nm_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive inputs has at most ``n`` nonzeros."""
    if weight.ndim != 2 or weight.shape[1] % m:
        return False
    nnz = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return bool((nnz <= n).all())


class _WeightSparsifier:
    """Shared machinery: a mask per prunable Linear, nested across calls to ``step_to``."""

    def __init__(self, include: LayerFilter | None = None) -> None:
        self.include = include
        self.masks = MaskSet()

    def _final_pruned(self, weight: Tensor, scores: Tensor) -> Tensor:
        raise NotImplementedError

    def _level_fraction(self, level: float) -> float:
        """Share of the target's pruned set that is pruned at ``level``."""
        return level

    @torch.no_grad()
    def step_to(self, model: nn.Module, level: float) -> dict[str, float]:
        """Prune ``model`` to ``level`` of the way towards the target; returns ``{"sparsity": ...}``.

        At each level, per layer, the pruned set is the ``level`` fraction of the target's pruned
        set with the smallest magnitudes, always including weights pruned at earlier levels.
        """
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"sparsity level must be in [0, 1], got {level}")
        layers = list(prunable_linears(model, self.include))
        if not layers:
            raise ValueError("the model has no prunable nn.Linear layers (check the include filter)")
        for name, lin in layers:
            w = lin.weight
            old = self.masks.masks.get(name)
            # Already-pruned weights score -1 so they stay pruned and are chosen first.
            scores = w.abs().float() if old is None else torch.where(old, w.abs().float(), torch.full_like(w, -1.0, dtype=torch.float32))
            final_pruned = self._final_pruned(w, scores)
            n_prune = int(round(self._level_fraction(level) * int(final_pruned.sum())))
            if old is not None:
                n_prune = max(n_prune, int((~old).sum()))
            keep = torch.ones_like(w, dtype=torch.bool)
            if n_prune:
                masked_scores = torch.where(final_pruned, scores, torch.full_like(scores, float("inf")))
                drop = masked_scores.flatten().topk(n_prune, largest=False).indices
                keep.view(-1)[drop] = False
            self.masks.set(name, keep)
        self.masks.apply_(model)
        return {"sparsity": self.masks.sparsity()}

    def enforce(self, model: nn.Module) -> None:
        self.masks.apply_(model)

    def state_dict(self) -> dict[str, Tensor]:
        return self.masks.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.masks.load_state_dict(state)


class MagnitudeSparsifier(_WeightSparsifier):
    """Unstructured, layer-wise magnitude pruning to ``target`` sparsity (e.g. 0.9).

    ``path`` maps a level ``t`` to a sparsity: ``"geometric"`` (default) keeps a fraction
    ``(1 - target)^t`` of the weights, so every step of a linear stage schedule removes the same
    share of the survivors; ``"linear"`` prunes ``t * target``, which leaves most of the damage
    to the last stage.
    """

    def __init__(self, target: float = 0.9, include: LayerFilter | None = None, path: str = "geometric") -> None:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"unstructured target sparsity must be in [0, 1), got {target}")
        if path not in ("geometric", "linear"):
            raise ValueError(f"path must be 'geometric' or 'linear', got {path!r}")
        super().__init__(include)
        self.target, self.path = target, path

    def _level_fraction(self, level: float) -> float:
        if self.path == "linear" or self.target == 0:
            return level
        return (1 - (1 - self.target) ** level) / self.target

    def _final_pruned(self, weight: Tensor, scores: Tensor) -> Tensor:
        n = int(round(self.target * weight.numel()))
        pruned = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        if n:
            pruned[scores.flatten().topk(n, largest=False).indices] = True
        return pruned.view_as(weight)

    def __repr__(self) -> str:
        return f"MagnitudeSparsifier(target={self.target}, path={self.path!r})"


class NMSparsifier(_WeightSparsifier):
    """N:M structured pruning (2:4 for sparse tensor cores); level 1 gives exact N:M masks."""

    def __init__(self, n: int = 2, m: int = 4, include: LayerFilter | None = None) -> None:
        super().__init__(include)
        self.n, self.m = n, m

    def _final_pruned(self, weight: Tensor, scores: Tensor) -> Tensor:
        return ~nm_mask(weight, self.n, self.m, scores)

    def __repr__(self) -> str:
        return f"NMSparsifier({self.n}:{self.m})"
