"""Token orders that make attention blocks spatio-temporally local (Video-BLADE's token reordering).

A video's tokens in raster order (frame, row, column) put one block of 64 or 128 consecutive
tokens on a strip of one or two rows: its pooled key says little about a region, and its
neighbours in space sit many blocks away. Ordered by 3D tiles of ``tile = (frames, rows, cols)``
tokens (one tile = one attention block), each block is a small cube of the video, so block-level
scores describe regions and the kept blocks of a query block are its spatio-temporal neighbours.
BLADE orders tokens along a 3D curve for the same reason; tiles of exactly the block size make
block = region without a curve's boundary effects.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["tile_order", "to_tile_order", "from_tile_order"]


@functools.lru_cache(maxsize=32)
def _tile_order_cpu(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> Tensor:
    for n, t, name in zip(grid, tile, ("frames", "rows", "columns")):
        if t < 1 or n % t:
            raise ValueError(f"a tile of {tile} does not tile a grid of {grid} (frames, rows, columns) tokens: "
                             f"{name} {n} is not a multiple of {t}; pick a tile that divides the grid")
    (f, h, w), (tf, th, tw) = grid, tile
    raster = torch.arange(f * h * w).view(f // tf, tf, h // th, th, w // tw, tw)
    return raster.permute(0, 2, 4, 1, 3, 5).reshape(-1)  # tiles in raster order, tokens in raster order inside


def tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """Raster token indices in tile order: ``x_raster[..., order, :]`` is ``x`` in tile order (a permutation)."""
    return _tile_order_cpu(tuple(grid), tuple(tile)).to(device)


def to_tile_order(x: Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int], dim: int = -2) -> Tensor:
    """Reorder the token dimension ``dim`` of ``x`` from raster to tile order."""
    return x.index_select(dim, tile_order(grid, tile, x.device))


def from_tile_order(x: Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int], dim: int = -2) -> Tensor:
    """Undo ``to_tile_order``."""
    return x.index_select(dim, torch.argsort(tile_order(grid, tile, x.device)))
