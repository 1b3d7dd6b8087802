"""Rotary position embeddings on tensors (rotate-half layout, Hugging Face's): 1D for text, 3D for video.

Shared by the models (Llama, the video DiT) and by the attention code that rotates its own
projections (DSA's indexer), so the attention code needs no model's config for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_angles", "apply_rope", "rope_3d_tables", "apply_rope_3d", "split_3d"]


def rope_angles(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin (S, dim) for integer or float ``positions`` (S,) at base ``theta``."""
    if dim % 2:
        raise ValueError(f"a rotary dimension must be even, got {dim}")
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    ang = positions.float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last dimension of ``x`` (..., S, dim) by the angles of ``cos``/``sin`` (S, dim), computed in fp32."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def split_3d(head_dim: int) -> tuple[int, int, int]:
    """How a head's dimensions are shared by time, rows and columns: a quarter to time, the rest split evenly (all even)."""
    t = 2 * (head_dim // 8)
    hw = 2 * ((head_dim - t) // 4)
    return t, hw, head_dim - t - hw


def rope_3d_tables(coords: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin (S, head_dim) for tokens at integer (frame, row, column) ``coords`` (S, 3).

    Each axis rotates its own slice of the head (``split_3d``); ``apply_rope_3d`` applies them.
    """
    parts = [rope_angles(coords[:, i], n, theta) for i, n in enumerate(split_3d(head_dim))]
    return torch.cat([c for c, _ in parts], -1), torch.cat([s for _, s in parts], -1)


def apply_rope_3d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``apply_rope`` on each axis's slice of the head (the layout of ``rope_3d_tables``), in one pass.

    Each slice's rotate-half is a fixed signed permutation of the head's dimensions, so the three
    rotations are one gather and one multiply-add (eager PyTorch runs a kernel per op: at video
    token counts the per-slice version's dozen fp32 passes cost more than the attention).
    """
    perm, sign = _rotate_half_3d(x.shape[-1], x.device)
    out = x.float() * cos
    return out.addcmul_(x.index_select(-1, perm).float(), sin * sign).to(x.dtype)


_ROTATIONS: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}


def _rotate_half_3d(head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(perm, sign) with ``rotate_half`` of every ``split_3d`` slice = ``x[..., perm] * sign``."""
    key = (head_dim, str(device))
    if key not in _ROTATIONS:
        # built once per (size, device); first called outside CUDA-graph capture (callers warm up before capturing)
        with torch.inference_mode(False):
            _ROTATIONS[key] = _make_rotation(head_dim, device)
    return _ROTATIONS[key]


def _make_rotation(head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    perm, sign, start = [], [], 0
    for n in split_3d(head_dim):
        h = n // 2
        perm += [start + h + j for j in range(h)] + [start + j for j in range(h)]
        sign += [-1.0] * h + [1.0] * h
        start += n
    return torch.tensor(perm, device=device), torch.tensor(sign, device=device)
