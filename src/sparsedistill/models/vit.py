"""Vision Transformer in one file, with timm's ``vit_*`` state_dict key names.

Pre-norm blocks (LayerNorm eps 1e-6, exact GELU), a class token or mean pooling, learned
absolute position embeddings that include the class token: the layout of timm's
``VisionTransformer`` with default options, so ``model.load_state_dict(timm_model.state_dict())``
works for ``vit_base_patch16_224``-style checkpoints (see ``load_timm_state_dict`` for resizing
and head replacement). Every Linear the 2:4 recipe prunes is an ``nn.Linear`` named ``qkv``,
``proj``, ``fc1`` or ``fc2``. ``forward_features(..., return_attn=True)`` also returns each
block's attention probabilities, for attention-map distillation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = ["ViTConfig", "VisionTransformer", "ViTOutput", "load_timm_state_dict"]


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: str = "token"  # "token" (class token) or "avg" (mean of patch tokens)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass
class ViTOutput:
    logits: Tensor
    tokens: Tensor  # (B, 1 + num_patches, D) after the final norm
    attentions: list[Tensor]  # per block (B, H, N, N); empty unless asked for
    hidden: list[Tensor]  # per block, its output tokens (B, N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to tokens. The weight is a Conv2d's (timm's key names and shape), but by
    default the projection runs as one GEMM over the patches cut out by a reshape: a 16 x 16 stride-16 convolution of
    3 channels is a poor fit for cuDNN's kernels (``as_gemm = False`` runs the convolution, e.g. to compare)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.img_size, self.in_chans, self.patch_size = cfg.img_size, cfg.in_chans, cfg.patch_size
        self.as_gemm = True

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}"
            )
        if not self.as_gemm:
            return self.proj(x).flatten(2).transpose(1, 2)
        b, c, p, g = x.shape[0], self.in_chans, self.patch_size, self.img_size // self.patch_size
        # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): each patch's values in the weight's (C, p, p) order
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def _add_branch(residual: Tensor | None, layer: nn.Module, x: Tensor) -> Tensor:
    """``residual + layer(x)``. A layer with ``takes_residual`` gets the residual (the 2:4 int8 layers of
    ``weights.sparse24`` add it in their GEMM's epilogue: the LayerNorm after reads one tensor instead of two)."""
    if residual is None:
        return layer(x)
    if getattr(layer, "takes_residual", False):
        return layer(x, residual=residual)
    return residual + layer(x)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: Tensor, return_attn: bool = False,
                residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The attention branch's output, plus ``residual`` if given; and the attention map if asked for."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if return_attn:  # explicit softmax, so the map can be distilled
            attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
            out = attn @ v
        else:
            attn, out = None, F.scaled_dot_product_attention(q, k, v)
        return _add_branch(residual, self.proj, out.transpose(1, 2).reshape(B, N, D)), attn


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = nn.GELU()  # a module, as timm's: weights.fuse_sparse24_mlps recognises fc1 -> act -> fc2
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    takes_residual = True  # fc2 gets the residual (a 2:4 int8 fc2 adds it in its epilogue)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return _add_branch(residual, self.fc2, self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.training and self.drop.p > 0:  # dropout acts on the branch, before the residual add
            a, attn = self.attn(self.norm1(x), return_attn)
            x = x + self.drop(a)
            return x + self.drop(self.mlp(self.norm2(x))), attn
        x, attn = self.attn(self.norm1(x), return_attn, residual=x)  # the last layer of a branch adds the residual
        return _add_branch(x, self.mlp, self.norm2(x)), attn


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, D) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # timm puts the final LayerNorm before pooling ("norm") for the class token, after it ("fc_norm") for mean pooling.
        avg = cfg.global_pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if avg else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x: Tensor, return_attn: bool = False) -> tuple[Tensor, list[Tensor]]:
        tokens, attns, _ = self._features(x, return_attn)
        return tokens, attns

    def _features(self, x: Tensor, return_attn: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        attns, hidden = [], []
        for blk in self.blocks:
            x, attn = blk(x, return_attn)
            hidden.append(x)
            if attn is not None:
                attns.append(attn)
        return self.norm(x), attns, hidden

    def forward_head(self, tokens: Tensor) -> Tensor:
        pooled = tokens[:, 1:].mean(1) if self.cfg.global_pool == "avg" else tokens[:, 0]
        return self.head(self.fc_norm(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)[0])

    def forward_distill(self, x: Tensor, return_attn: bool = True) -> ViTOutput:
        """Logits plus what feature and attention distillation need (every block's tokens and attention)."""
        tokens, attns, hidden = self._features(x, return_attn)
        return ViTOutput(self.forward_head(tokens), tokens, attns, hidden)

    def flops(self, sparse_linears: tuple[str, ...] = ()) -> dict[str, int]:
        """Forward FLOPs per image (2 x multiply-adds); Linears named in ``sparse_linears`` count half (2:4)."""
        c = self.cfg
        n, d, h = c.num_patches + 1, c.embed_dim, int(c.embed_dim * c.mlp_ratio)
        linear = {"qkv": d * 3 * d, "proj": d * d, "fc1": d * h, "fc2": h * d}
        per_block = sum(n * macs * (0.5 if name in sparse_linears else 1.0) for name, macs in linear.items())
        attention = 2 * n * n * d  # q k^T and attn v
        other = c.num_patches * d * c.in_chans * c.patch_size**2 + d * c.num_classes
        return {"total": int(2 * (c.depth * (per_block + attention) + other)), "linear": int(2 * c.depth * per_block)}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def load_timm_state_dict(model: VisionTransformer, state_dict: dict[str, Tensor]) -> list[str]:
    """Load a timm ``vit_*`` state_dict into ``model``; returns notes on what was adapted.

    Position embeddings are resampled (bicubic) to the model's patch grid; a classifier head of
    another size is left at its initialisation, with a warning. Anything else that does not
    match (another architecture, depth or width) is an error that lists the offending keys.
    """
    sd = dict(state_dict)
    own = model.state_dict()
    notes: list[str] = []
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    if unexpected or missing:
        raise ValueError(
            "checkpoint does not match this ViT (another architecture, depth or options?): "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    pe = sd["pos_embed"]
    if pe.shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resample_pos_embed(pe, model.cfg.num_patches)
        notes.append(f"pos_embed resampled from {tuple(pe.shape)} to {tuple(own['pos_embed'].shape)}")
    if sd["head.weight"].shape != own["head.weight"].shape:
        for k in ("head.weight", "head.bias"):
            sd[k] = own[k]
        notes.append(f"classifier head ({state_dict['head.weight'].shape[0]} classes) not loaded: the model has {model.cfg.num_classes}")
        warnings.warn(notes[-1], stacklevel=2)
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"checkpoint shapes do not match this ViT: {bad[:6]}")
    model.load_state_dict(sd)
    return notes


def _resample_pos_embed(pe: Tensor, num_patches: int) -> Tensor:
    cls, grid = pe[:, :1], pe[:, 1:]
    old, new = int(math.isqrt(grid.shape[1])), int(math.isqrt(num_patches))
    if old * old != grid.shape[1] or new * new != num_patches:
        raise ValueError("position embeddings can only be resampled between square patch grids")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pe.dtype)], dim=1)


def _vit(**kw) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**kw))


@register_model
def vit_fmnist_tiny(num_classes: int = 10, **kw) -> VisionTransformer:
    """A small ViT for 28x28 grey images (Fashion-MNIST): patch 4, width 192, 6 blocks, mean pooling."""
    return _vit(**{"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": num_classes, "embed_dim": 192,
                   "depth": 6, "num_heads": 3, "global_pool": "avg", **kw})


@register_model
def vit_fmnist_micro(num_classes: int = 10, **kw) -> VisionTransformer:
    """The demo's ViT (a CPU-minutes budget): 28x28 grey images, patch 7 (16 tokens), width 128, 4 blocks, mean pooling."""
    return _vit(**{"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": num_classes, "embed_dim": 128,
                   "depth": 4, "num_heads": 2, "global_pool": "avg", **kw})


@register_model
def vit_base_patch16_224(num_classes: int = 1000, **kw) -> VisionTransformer:
    return _vit(**{"num_classes": num_classes, "embed_dim": 768, "depth": 12, "num_heads": 12, **kw})


@register_model
def vit_large_patch16_224(num_classes: int = 1000, **kw) -> VisionTransformer:
    return _vit(**{"num_classes": num_classes, "embed_dim": 1024, "depth": 24, "num_heads": 16, **kw})
