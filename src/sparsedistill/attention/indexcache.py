"""DeepSeek Sparse Attention for a decoder LM, and IndexCache: later layers reuse an earlier layer's top-k.

- ``LightningIndexer``: a few indexer heads with a small head dim and per-head weights computed
  from the hidden state, scoring every visible key (``attention.topk``'s kernel on a GPU); RoPE on
  part of the head dims (``rope_dims``) lets the scores depend on the distance to the key.
- ``IndexPattern``: per layer ``F`` (Full: run its own indexer) or ``S`` (Shared: reuse the top-k
  of the nearest preceding Full layer), read from and written as vLLM's ``index_topk_pattern``
  string ("FSSS...") or ``index_topk_freq``. Layer 0 must be Full.
- ``indexer_kl``: the warm-up / training loss, KL from the dense attention distribution (summed
  over heads, renormalised) to the indexer's softmax over the same keys.
- ``greedy_pattern``: training-free search that turns Full layers into Shared, one at a time, the
  one whose change raises the calibration loss least.
- ``topk_overlap``: the share of one layer's selected keys that another layer also selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._runtime import triton_can_run
from .topk import indexer_scores, indexer_scores_reference, indexer_topk
from .topk_union import MAX_UNION_RATIO, TopkSelection, group_union, sampled_union_ratio

__all__ = ["IndexPattern", "LightningIndexer", "DSA", "indexer_kl", "indexer_loss", "layer_inputs", "dense_attention_probs",
           "greedy_pattern", "topk_overlap", "topk_from_scores", "keep_sink_and_local"]


@dataclass(frozen=True)
class IndexPattern:
    """Which layers run their own indexer (``F``) and which reuse the last Full layer's selection (``S``)."""

    layers: str  # e.g. "FSSSFSSS..."

    def __post_init__(self) -> None:
        if not self.layers or set(self.layers) - {"F", "S"}:
            raise ValueError(f"an index pattern is a string of 'F' and 'S', got {self.layers!r}")
        if self.layers[0] != "F":
            raise ValueError("layer 0 must be Full (F): a Shared layer needs an earlier selection to reuse")

    @classmethod
    def parse(cls, pattern: str, n_layers: int) -> "IndexPattern":
        if len(pattern) != n_layers:
            raise ValueError(f"index_topk_pattern has {len(pattern)} entries but the model has {n_layers} layers")
        return cls(pattern)

    @classmethod
    def every(cls, freq: int, n_layers: int) -> "IndexPattern":
        """``index_topk_freq``: a Full layer every ``freq`` layers, starting at layer 0."""
        if freq < 1:
            raise ValueError(f"index_topk_freq must be >= 1, got {freq}")
        return cls("".join("F" if i % freq == 0 else "S" for i in range(n_layers)))

    @classmethod
    def full(cls, n_layers: int) -> "IndexPattern":
        return cls("F" * n_layers)

    def source(self, layer: int) -> int:
        """The Full layer whose selection ``layer`` uses."""
        return self.layers.rindex("F", 0, layer + 1)

    @property
    def n_full(self) -> int:
        return self.layers.count("F")

    def freq(self) -> int | None:
        """The ``index_topk_freq`` that writes this pattern, if it is a regular one."""
        for f in range(1, len(self.layers) + 1):
            if IndexPattern.every(f, len(self.layers)) == self:
                return f
        return None

    def __str__(self) -> str:
        return self.layers


class LightningIndexer(nn.Module):
    """``I(t, s) = sum_j w[t, j] * ReLU(q[t, j] . k[s])`` from hidden states (B, S, dim).

    As in DeepSeek-V3.2's indexer, the first ``rope_dims`` dims of every q and k are rotated by
    their token's position (RoPE at base ``rope_theta``, the model's rotate-half layout), so the
    scores can depend on the distance ``t - s``; the rest carry content only. 0 turns RoPE off.
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 32, rope_dims: int = 0, rope_theta: float = 10000.0) -> None:
        super().__init__()
        if rope_dims % 2 or not 0 <= rope_dims <= head_dim:
            raise ValueError(f"indexer rope_dims must be even and in [0, head_dim {head_dim}], got {rope_dims}")
        self.heads, self.head_dim = heads, head_dim
        self.rope_dims, self.rope_theta = rope_dims, rope_theta
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.ww = nn.Linear(dim, heads, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, S, heads, head_dim), w (B, S, heads), k (B, S, head_dim) for tokens at positions ``start, start + 1, ...``."""
        b, s, _ = x.shape
        x = x.to(self.wq.weight.dtype)  # the indexer trains in fp32 beside a bf16 model
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        w = self.ww(x) * self.heads**-0.5
        if self.rope_dims:
            from .rope import apply_rope, rope_angles

            r = self.rope_dims
            cos, sin = rope_angles(torch.arange(start, start + s, device=x.device), r, self.rope_theta)
            q = torch.cat([apply_rope(q[..., :r], cos[:, None], sin[:, None]), q[..., r:]], -1)
            k = torch.cat([apply_rope(k[..., :r], cos, sin), k[..., r:]], -1)
        return q, w, k

    def scores(self, x: Tensor, causal: bool = True) -> Tensor:
        """(B, S, S) fp32 scores of tokens at positions 0..S-1, -inf where a key is not visible; differentiable on the reference path."""
        q, w, k = self.project(x)
        if triton_can_run(q) and not torch.is_grad_enabled():
            return indexer_scores(q, w, k, causal)
        return indexer_scores_reference(q, w, k, causal)


def topk_from_scores(scores: Tensor, topk: int) -> Tensor:
    """(B, S, topk) int32 indices of the highest visible scores, -1 where fewer keys are visible."""
    vals, idx = scores.topk(min(topk, scores.shape[-1]), dim=-1)
    idx = torch.where(torch.isfinite(vals), idx, -1).to(torch.int32)
    if idx.shape[-1] < topk:
        idx = F.pad(idx, (0, topk - idx.shape[-1]), value=-1)
    return idx


@torch.no_grad()
def rank_by_score(q: Tensor, w: Tensor, k: Tensor, idx: Tensor, chunk: int = 1024) -> Tensor:
    """``idx`` (B, Sq, n) reordered best first by the indexer's score (ties: the order given), -1 last; queries are
    done ``chunk`` at a time, so the gathered keys take chunk x n x Di, not Sq x n x Di."""
    out = torch.empty_like(idx)
    for s0 in range(0, idx.shape[1], chunk):
        part = idx[:, s0 : s0 + chunk]
        keys = k[torch.arange(k.shape[0], device=k.device)[:, None, None], part.clamp(min=0).long()]  # (B, c, n, Di)
        s = torch.einsum("bchd,bcnd->bchn", q[:, s0 : s0 + chunk].float(), keys.float()).relu()
        s = (s * w[:, s0 : s0 + chunk].float()[..., None]).sum(2).masked_fill(part < 0, float("-inf"))
        out[:, s0 : s0 + chunk] = part.gather(-1, torch.sort(s, dim=-1, descending=True, stable=True).indices)
    return out


def keep_sink_and_local(idx: Tensor, kv_len: int, sink: int, local: int) -> Tensor:
    """``idx`` (B, Sq, k), best first, with the first ``sink`` keys and each query's ``local`` nearest (itself
    included) always in it; the rest of the k slots keep the best other indices. Queries are the last Sq of
    ``kv_len`` positions. -1 marks empty slots, and no index appears twice (what the top-k kernel needs)."""
    b, sq, k = idx.shape
    n_forced = sink + local
    if not n_forced:
        return idx
    if n_forced > k:
        raise ValueError(f"sink {sink} + local {local} keys do not fit in k = {k}")
    t = torch.arange(kv_len - sq, kv_len, device=idx.device)[:, None]  # each query's position
    forced = torch.cat([torch.arange(sink, device=idx.device).expand(sq, sink), t - local + 1 + torch.arange(local, device=idx.device)], 1)
    dup = (torch.arange(n_forced, device=idx.device) >= sink) & (forced < sink)  # a local key that is a sink key too
    forced = torch.where((forced >= 0) & (forced <= t) & ~dup, forced, -1).to(idx.dtype)
    other = (idx >= 0) & (idx >= sink) & (idx <= t - local)  # indexer picks that are not forced anyway
    order = torch.sort((~other).to(torch.int8), dim=-1, stable=True).indices[..., : k - n_forced]
    rest = torch.where(other.gather(-1, order), idx.gather(-1, order), -1)
    return torch.cat([forced.expand(b, sq, n_forced), rest], -1)


def indexer_kl(scores: Tensor, attn_probs: Tensor, selected: Tensor | None = None) -> Tensor:
    """KL(dense attention || indexer) per query, averaged.

    ``attn_probs`` (B, H, S, S) are the main model's attention probabilities; summed over heads
    and renormalised they are the target. With ``selected`` (B, S, k) indices (the sparse stage),
    both distributions are restricted to the selected keys and renormalised there.
    """
    target = attn_probs.float().sum(1)
    logits = scores
    if selected is not None:
        keep = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, selected.clamp(min=0).long(), selected >= 0)
        target = target.masked_fill(~keep, 0.0)
        logits = logits.masked_fill(~keep, float("-inf"))
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
    log_q = torch.log_softmax(logits, -1)
    kl = torch.where(target > 0, target * (target.clamp(min=1e-12).log() - log_q), torch.zeros_like(target)).sum(-1)
    return kl.mean()


def topk_overlap(a: Tensor, b: Tensor) -> float:
    """Mean share of ``a``'s selected keys (B, S, k; -1 padding) that ``b`` selects too."""
    n = int(max(a.max(), b.max())) + 2
    in_b = torch.zeros(*b.shape[:-1], n, dtype=torch.bool, device=b.device).scatter_(-1, (b + 1).long(), True)
    in_b[..., 0] = False  # padding is not a selection
    hit = in_b.gather(-1, (a + 1).long()) & (a >= 0)
    return float(hit.sum() / (a >= 0).sum().clamp(min=1))


def greedy_pattern(n_layers: int, target_full: int, loss: Callable[[IndexPattern], float],
                   progress: Callable[[str], None] | None = None,
                   start: list[tuple[str, float]] | None = None) -> tuple[IndexPattern, list[tuple[str, float]]]:
    """Turn Full layers into Shared one at a time, each time the one whose change raises ``loss`` least.

    ``loss(pattern)`` is the calibration LM loss with that pattern. Returns the final pattern and
    the path ``[(pattern, loss), ...]``. Costs about n_layers^2 / 2 loss evaluations. ``start``, the
    path of an earlier search with the same loss to a larger target, continues from its end: the
    search is deterministic, so the result is the one a fresh search would find.
    """
    if not 1 <= target_full <= n_layers:
        raise ValueError(f"target number of Full layers must be in [1, {n_layers}], got {target_full}")
    if start:
        if IndexPattern(start[-1][0]).n_full < target_full or len(start[0][0]) != n_layers:
            raise ValueError(f"start path ends at {start[-1][0]}: it must have {n_layers} layers and at least {target_full} Full")
        path = [(p, loss_) for p, loss_ in start if IndexPattern(p).n_full >= target_full]
        pattern = IndexPattern(path[-1][0])
    else:
        pattern = IndexPattern.full(n_layers)
        path = [(str(pattern), loss(pattern))]
    while pattern.n_full > target_full:
        trials = []
        for i in range(1, n_layers):  # layer 0 stays Full
            if pattern.layers[i] == "F":
                cand = IndexPattern(pattern.layers[:i] + "S" + pattern.layers[i + 1 :])
                trials.append((loss(cand), cand))
        best_loss, pattern = min(trials, key=lambda t: t[0])
        path.append((str(pattern), best_loss))
        if progress:
            progress(f"{pattern.n_full} Full layers: {pattern} loss {best_loss:.4f}")
    return pattern, path


class DSA(nn.Module):
    """A selector for ``Llama.forward(..., select=dsa)``: per-layer lightning indexers, top-k, an IndexCache pattern.

    Full layers run their indexer on the layer's normed input and keep the ``topk`` best keys;
    Shared layers reuse the indices of the nearest preceding Full layer. ``selected`` holds every
    layer's indices of the last forward (for overlap statistics); ``record_inputs`` keeps the
    indexers' inputs too (for training them against the dense attention). For generation with a
    ``KVCache``, ``start_cache`` keeps the Full layers' indexer keys as well (rotated at their
    positions), so a decode step scores only its new query, at position = the cache length,
    against every cached key.
    """

    def __init__(self, n_layers: int, dim: int, topk: int, heads: int = 4, head_dim: int = 32,
                 pattern: IndexPattern | None = None, *, rope_dims: int = 0, rope_theta: float = 10000.0,
                 sink: int = 0, local: int = 0) -> None:
        super().__init__()
        self.indexers = nn.ModuleList(LightningIndexer(dim, heads, head_dim, rope_dims, rope_theta) for _ in range(n_layers))
        self.topk = topk
        if sink < 0 or local < 0 or sink + local > topk:
            raise ValueError(f"sink {sink} and local {local} must be >= 0 and fit in topk {topk}")
        self.sink, self.local = sink, local  # keys every selection keeps: the first ones, each query's nearest
        self.pattern = pattern or IndexPattern.full(n_layers)
        if len(self.pattern.layers) != n_layers:
            raise ValueError(f"pattern {self.pattern} has {len(self.pattern.layers)} layers, the model {n_layers}")
        self.selected: dict[int, Tensor] = {}
        self.record_inputs = False
        self.inputs: dict[int, Tensor] = {}
        self.score_dtype = torch.float32  # bf16 halves the bytes the top-k reads (speed runs)
        self.indexer_method = "topk"  # or "prefilter": the exact top-k without a score matrix (indexer_topk)
        # > 0: prefill selections carry their union over groups of this many queries (TopkSelection), built once per
        # Full layer and reused by its Shared layers, so attention can run the group-union kernel
        self.union_group = 0
        # ... built only where a sample of groups says the union kernel pays (u <= this x union_group); else the
        # selection stays a tensor and attention runs per token
        self.max_union_ratio = MAX_UNION_RATIO
        self._current: Tensor | None = None
        self._keys: dict[int, Tensor] = {}  # Full layer -> (B, max_len, head_dim) indexer keys while generating
        self._lengths: dict[int, int] = {}

    def start_cache(self, batch: int, max_len: int, device, dtype) -> None:
        """Keep indexer keys across calls (prefill, then decode steps), like the model's ``KVCache``."""
        hd = self.indexers[0].head_dim
        self._keys = {i: torch.zeros(batch, max_len, hd, device=device, dtype=dtype)
                      for i, kind in enumerate(self.pattern.layers) if kind == "F"}
        self._lengths = dict.fromkeys(self._keys, 0)

    def stop_cache(self) -> None:
        self._keys, self._lengths = {}, {}

    def _select(self, layer: int, h: Tensor) -> Tensor:
        start = self._lengths[layer] if self._keys else 0  # this call's tokens continue the cached ones
        q, w, k = self.indexers[layer].project(h, start)  # keys are cached rotated, as the model caches its k
        kv_len = None
        if self._keys:  # append this call's keys, score against everything cached
            cache = self._keys[layer]
            if start + h.shape[1] > cache.shape[1]:
                raise ValueError(f"indexer cache holds {cache.shape[1]} tokens; {start + h.shape[1]} needed")
            cache[:, start : start + h.shape[1]] = k
            self._lengths[layer] = kv_len = start + h.shape[1]
            k = cache
        visible = kv_len if kv_len is not None else k.shape[1]
        idx = indexer_topk(q, w, k, min(self.topk, visible), kv_len=kv_len, score_dtype=self.score_dtype,
                           method=self.indexer_method)
        if self.sink or self.local:
            if self.indexer_method == "prefilter":  # ascending key order: keep_sink_and_local wants best first
                idx = rank_by_score(q, w, k, idx)
            if idx.shape[-1] < self.topk:
                idx = F.pad(idx, (0, self.topk - idx.shape[-1]), value=-1)
            idx = keep_sink_and_local(idx, visible, self.sink, self.local)
        return F.pad(idx, (0, self.topk - idx.shape[-1]), value=-1) if idx.shape[-1] < self.topk else idx

    def forward(self, layer: int, h: Tensor) -> Tensor | TopkSelection:
        if self.record_inputs:
            self.inputs[layer] = h.detach()
        if self.pattern.layers[layer] == "F":
            inference = not torch.is_grad_enabled()  # (training attends through masked SDPA: no union needed)
            with torch.no_grad():
                self._current = self._select(layer, h)
                # a prefill: the union once, for every layer reusing this selection
                if (self.union_group and h.shape[1] > 1 and inference
                        and sampled_union_ratio(self._current, self.union_group) <= self.max_union_ratio * self.union_group):
                    self._current = TopkSelection(self._current, group_union(self._current, self.union_group))
        if self._current is None:
            raise RuntimeError("a Shared layer ran before any Full layer: layer 0 must be Full")
        current = self._current
        self.selected[layer] = current.indices if isinstance(current, TopkSelection) else current
        return current


@torch.no_grad()
def layer_inputs(model: nn.Module, tokens: Tensor) -> dict[int, Tensor]:
    """Each layer's normed attention input on the dense forward (what that layer's indexer sees)."""
    rec: dict[int, Tensor] = {}
    model(tokens, select=lambda i, h: rec.__setitem__(i, h))  # returns None: dense attention
    return rec


@torch.no_grad()
def dense_attention_probs(model: nn.Module, layer: int, h: Tensor) -> Tensor:
    """(B, H, S, S) causal attention probabilities of ``model``'s ``layer`` for its normed input ``h``."""
    from .rope import rope_angles

    attn = model.model.layers[layer].self_attn
    cos, sin = rope_angles(torch.arange(h.shape[1], device=h.device), model.cfg.head_dim, model.cfg.rope_theta)
    q, k, _ = attn.qkv(h, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=h.device).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1)


def indexer_loss(model: nn.Module, dsa: DSA, inputs: dict[int, Tensor], sparse: bool = False) -> Tensor:
    """Mean KL over the Full layers; each Full layer's indexer learns the attention of every layer it serves.

    With one layer per indexer (all Full) this is DSA's warm-up; with Shared layers it is
    IndexCache's multi-layer distillation. ``sparse`` restricts the KL to the selected keys.
    """
    losses = []
    for i, kind in enumerate(dsa.pattern.layers):
        if kind != "F":
            continue
        served = [j for j in range(len(dsa.pattern.layers)) if dsa.pattern.source(j) == i]
        target = torch.cat([dense_attention_probs(model, j, inputs[j]) for j in served], 1)  # heads of every served layer
        scores = dsa.indexers[i].scores(inputs[i])
        selected = topk_from_scores(scores.detach(), dsa.topk) if sparse else None
        losses.append(indexer_kl(scores, target, selected))
    return torch.stack(losses).mean()
