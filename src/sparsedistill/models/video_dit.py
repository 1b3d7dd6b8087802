"""A class-conditional video diffusion transformer (DiT) in one file, for rectified-flow training.

Videos (B, C, F, H, W) are cut into 3D patches; each patch is one token. Tokens are kept in
*tile order* (``attention.token_order``): consecutive runs of ``tile`` tokens form one
spatio-temporal box, so an attention block of that many tokens is a region of the video and
block-sparse attention (ASA) can keep or drop regions. Positions enter through 3D rotary
embeddings on queries and keys (time, rows and columns each rotate their own slice of a head).
Blocks are DiT's adaLN-Zero blocks, conditioned on the flow time and the class (``num_classes``
is the null class that classifier-free guidance uses). The model predicts the flow velocity
``v = noise - x0`` for ``x_t = (1 - t) x0 + t noise``.

Self-attention is one swappable module per block (``set_attention``): dense SDPA by default,
e.g. ``AdaptiveBlockSparseAttention`` for a sparse student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention.rope import apply_rope_3d, rope_3d_tables
from ..attention.token_order import tile_order
from .registry import register_model

__all__ = ["VideoDiTConfig", "VideoDiT", "DenseAttention"]


@dataclass(frozen=True)
class VideoDiTConfig:
    frames: int = 8
    height: int = 64
    width: int = 64
    channels: int = 1
    patch: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) per token
    tile: tuple[int, int, int] | None = (2, 8, 8)  # tokens per attention block, in (frames, rows, columns); None: raster
    dim: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for n, p, name in zip((self.frames, self.height, self.width), self.patch, ("frames", "height", "width")):
            if p < 1 or n % p:
                raise ValueError(f"{name} {n} is not a multiple of the patch size {p} (patch = {self.patch}); "
                                 "pick a frame count / resolution the patches tile")
        if self.tile is not None:
            for n, t, name in zip(self.grid, self.tile, ("frames", "rows", "columns")):
                if t < 1 or n % t:
                    raise ValueError(f"the token grid {self.grid} is not tiled by {self.tile}: {name} {n} is not a "
                                     f"multiple of {t}; pick a tile that divides the grid (or tile=None)")
        if self.dim % self.heads or (self.dim // self.heads) % 8:
            raise ValueError(f"dim {self.dim} must split into {self.heads} heads of a multiple of 8 dimensions")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (frames, rows, columns)."""
        return self.frames // self.patch[0], self.height // self.patch[1], self.width // self.patch[2]

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def block(self) -> int | None:
        """Tokens per tile: the attention block size this model's token order is made for."""
        return None if self.tile is None else math.prod(self.tile)


class DenseAttention(nn.Module):
    """``scaled_dot_product_attention`` on (B, H, S, D): the dense path (flash where it applies)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])  # one kernel: eager pays per op at 8K+ tokens


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype, so bf16 activations take the fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Block(nn.Module):
    def __init__(self, cfg: VideoDiTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = RMSNorm(cfg.head_dim, eps=1e-6)  # query/key norms keep attention logits tame in bf16
        self.k_norm = RMSNorm(cfg.head_dim, eps=1e-6)
        self.attention: nn.Module = DenseAttention()
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)  # shift, scale, gate for attention and MLP
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, -1)
        q, k, v = self.qkv(_modulate(self.norm1(x), sh1, sc1)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope_3d(self.q_norm(q), cos, sin), apply_rope_3d(self.k_norm(k), cos, sin)
        a = self.attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = torch.addcmul(x, g1[:, None], self.proj(a))
        return torch.addcmul(x, g2[:, None], self.fc2(F.gelu(self.fc1(_modulate(self.norm2(x), sh2, sc2)), approximate="tanh")))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, dim) of flow times t in [0, 1] (scaled to [0, 1000], as DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], -1)


class VideoDiT(nn.Module):
    def __init__(self, cfg: VideoDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        patch_values = cfg.channels * math.prod(cfg.patch)
        self.patch_embed = nn.Linear(patch_values, cfg.dim)
        self.t_embed = nn.Sequential(nn.Linear(256, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # the last row: the null class (CFG)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = nn.Linear(cfg.dim, patch_values)
        for m in (self.ada_out, self.head):  # adaLN-Zero: every block and the output start as identity / zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        f, h, w = cfg.grid
        order = tile_order(cfg.grid, cfg.tile) if cfg.tile is not None else torch.arange(cfg.tokens)
        coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 3)
        cos, sin = rope_3d_tables(coords[order], cfg.head_dim, cfg.rope_theta)
        self.register_buffer("order", order, persistent=False)  # raster index of each token, in model order
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def set_attention(self, make: Callable[[int], nn.Module] | None) -> "VideoDiT":
        """Give block ``i`` the self-attention module ``make(i)`` (None: dense SDPA everywhere), in the model's mode."""
        for i, blk in enumerate(self.blocks):
            blk.attention = (DenseAttention() if make is None else make(i)).train(self.training)
        return self

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, F, H, W) -> (B, tokens, C * patch volume), tokens in model (tile) order."""
        cfg = self.cfg
        b, c = x.shape[:2]
        (f, h, w), (pf, ph, pw) = cfg.grid, cfg.patch
        x = x.reshape(b, c, f, pf, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, f * h * w, -1)
        return x[:, self.order]

    def unpatchify(self, tokens: Tensor) -> Tensor:
        cfg = self.cfg
        b = tokens.shape[0]
        (f, h, w), (pf, ph, pw) = cfg.grid, cfg.patch
        x = tokens[:, self.inverse].reshape(b, f, h, w, pf, ph, pw, cfg.channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.channels, f * pf, h * ph, w * pw)

    def check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        cfg = self.cfg
        want = (cfg.channels, cfg.frames, cfg.height, cfg.width)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected videos (B, C, F, H, W) = (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"expected one time and one class per video, got t {tuple(t.shape)}, y {tuple(y.shape)}")
        if y.dtype not in (torch.int32, torch.int64) or bool(((y < 0) | (y > cfg.num_classes)).any()):
            raise ValueError(f"class ids must be integers in 0..{cfg.num_classes - 1}, or {cfg.num_classes} for "
                             f"'no class' (guidance); got {y.tolist() if y.numel() < 20 else y}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, F, H, W) at flow time ``t`` (B,) in [0, 1] for classes ``y`` (B,)."""
        c = self.t_embed(timestep_embedding(t, 256).to(x.dtype)) + self.y_embed(y)
        h = self.patch_embed(self.patchify(x))
        cos, sin = self.rope_cos.to(h.dtype), self.rope_sin.to(h.dtype)
        for blk in self.blocks:
            h = blk(h, c, cos, sin)
        sh, sc = self.ada_out(F.silu(c)).chunk(2, -1)
        return self.unpatchify(self.head(_modulate(self.norm_out(h), sh, sc)))


def _video_dit(**kw) -> VideoDiT:
    return VideoDiT(VideoDiTConfig(**kw))


@register_model
def video_dit_fmnist(**kw) -> VideoDiT:
    """Moving Fashion-MNIST: 8 frames of 64 x 64, 2 x 2 patches: 8,192 tokens in 2 x 8 x 8 tiles (ASA blocks of 128,
    as BLADE's), width 256, 8 blocks of 4 heads of 64 (~9.7M parameters: a teacher that trains in minutes on one GPU)."""
    return _video_dit(**kw)


@register_model
def video_dit_fmnist_tiny(**kw) -> VideoDiT:
    """The CPU check's model: 8 frames of 32 x 32, 2 x 2 patches: 2,048 tokens, tiles of 64, two blocks."""
    return _video_dit(**{"frames": 8, "height": 32, "width": 32, "dim": 128, "depth": 2, "heads": 2, **kw})


@register_model
def video_dit_real(**kw) -> VideoDiT:
    """The real-clip check (``data/real_clips.py``): ``video_dit_fmnist``'s shape, six classes (the source videos)."""
    return _video_dit(**{"num_classes": 6, **kw})


@register_model
def video_dit_real_tiny(**kw) -> VideoDiT:
    """The real-clip check's CPU model: ``video_dit_fmnist_tiny``'s shape, six classes."""
    return video_dit_fmnist_tiny(**{"num_classes": 6, **kw})


@register_model
def video_dit_wan_1_3b_shape(**kw) -> VideoDiT:
    """Wan2.1-1.3B's transformer shape (random weights; for timing): 21 x 30 x 52 = 32,760 latent tokens of 16
    channels, width 1536, 30 blocks of 12 heads of 128, MLP 8960 (ratio 35/6); raster token order."""
    return _video_dit(**{"frames": 21, "height": 30, "width": 52, "channels": 16, "patch": (1, 1, 1), "tile": None,
                         "dim": 1536, "depth": 30, "heads": 12, "mlp_ratio": 8960 / 1536, **kw})
