"""Batched image augmentation on the batch's device, reproducible from a generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip"]


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> Tensor:
    """Per image: zero-pad by ``pad``, crop back to the original size at a random offset, flip left-right half the time.

    ``x`` is ``(B, C, H, W)``; the random draws come from ``generator`` so a batch can be
    reproduced exactly, e.g. after a resume. A generator on ``x``'s device draws there, which
    spares the host a copy (and a wait for the GPU) per batch.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=generator.device).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(-1, x.shape[1], -1, padded.shape[3])
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(-1, x.shape[1], h, -1)
    out = out.gather(3, cols)
    if flip:
        mirrored = torch.rand(b, generator=generator, device=generator.device).to(x.device) < 0.5
        out = torch.where(mirrored[:, None, None, None], out.flip(3), out)
    return out
