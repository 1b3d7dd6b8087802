"""Block-sparse attention masks as compact index lists, not dense boolean matrices.

For every (batch, head, query block) a ``BlockMask`` holds the key blocks to visit
(``kv_indices``, padded with -1) and how many there are (``kv_counts``); the transposed lists
(query blocks per key block) serve the backward pass. Building one from a block-level boolean
matrix is a sort and a cumulative sum on the GPU: the cost grows with the number of blocks
(S/64 squared), not with S squared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BlockMask", "SUPPORTED_BLOCKS"]

SUPPORTED_BLOCKS = (64, 128)


def _lists(keep: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(indices of True along the last dim, padded with -1 and sorted; counts) for a (..., n) bool tensor.

    ``width`` fixes the lists' length (no host sync); by default it is the longest list's.
    """
    n = keep.shape[-1]
    counts = keep.sum(-1, dtype=torch.int32)
    # kept columns first, in increasing order: sort by (not kept, column)
    order = torch.argsort((~keep).to(torch.int32) * n + torch.arange(n, device=keep.device), dim=-1).to(torch.int32)
    if width is None:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
    idx = order[..., :width]
    idx = torch.where(torch.arange(width, device=keep.device) < counts[..., None], idx, torch.full_like(idx, -1))
    return idx.contiguous(), counts.contiguous()


@dataclass(frozen=True)
class BlockMask:
    kv_indices: Tensor  # (B, H, n_q_blocks, max_kv) int32, -1 padded
    kv_counts: Tensor  # (B, H, n_q_blocks) int32
    q_indices: Tensor | None  # (B, H, n_k_blocks, max_q) int32: the query blocks that visit each key block
    q_counts: Tensor | None  # (B, H, n_k_blocks) int32; both None until a backward needs them (``with_transposed``)
    block: int
    seq_q: int
    seq_k: int

    @classmethod
    def from_block_bool(cls, keep: Tensor, block: int, seq_q: int, seq_k: int | None = None) -> "BlockMask":
        """From ``keep`` of shape (B, H, ceil(seq_q / block), ceil(seq_k / block)): True = attend to that block."""
        seq_k = seq_q if seq_k is None else seq_k
        if block not in SUPPORTED_BLOCKS:
            raise ValueError(f"block size {block} is not supported; use one of {SUPPORTED_BLOCKS}")
        want = (-(-seq_q // block), -(-seq_k // block))
        if keep.ndim != 4 or tuple(keep.shape[2:]) != want:
            raise ValueError(f"block mask must be (B, H, {want[0]}, {want[1]}) for seq {seq_q}x{seq_k} and block {block}, "
                             f"got {tuple(keep.shape)}")
        if keep.dtype != torch.bool:
            raise ValueError(f"block mask must be a bool tensor, got {keep.dtype}")
        kv_indices, kv_counts = _lists(keep)
        q_indices, q_counts = _lists(keep.transpose(-1, -2))
        return cls(kv_indices, kv_counts, q_indices, q_counts, block, seq_q, seq_k)

    @classmethod
    def full(cls, batch: int, heads: int, seq_q: int, block: int = 64, seq_k: int | None = None,
             causal: bool = False, device: torch.device | str = "cpu") -> "BlockMask":
        """Every block (dense attention), or every block on or below the diagonal (``causal``)."""
        seq_k = seq_q if seq_k is None else seq_k
        nq, nk = -(-seq_q // block), -(-seq_k // block)
        keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
        if causal:
            keep = causal_blocks(nq, nk, block, seq_q, seq_k, device)
        return cls.from_block_bool(keep.expand(batch, heads, nq, nk), block, seq_q, seq_k)

    @classmethod
    def from_kv_lists(cls, kv_indices: Tensor, kv_counts: Tensor, block: int, seq_q: int, seq_k: int) -> "BlockMask":
        """From per-query-block lists (kept key blocks first, ascending, -1 after); the transposed lists come later."""
        if block not in SUPPORTED_BLOCKS:
            raise ValueError(f"block size {block} is not supported; use one of {SUPPORTED_BLOCKS}")
        return cls(kv_indices, kv_counts, None, None, block, seq_q, seq_k)

    def with_transposed(self) -> "BlockMask":
        """This mask, its query-block lists per key block (what the backward reads) filled in once and kept.

        Built without a host sync (lists as long as the query blocks), so a backward can be graph-captured.
        """
        if self.q_indices is None:
            q_indices, q_counts = _lists(self.to_block_bool().transpose(-1, -2), width=self.kv_counts.shape[-1])
            object.__setattr__(self, "q_indices", q_indices)  # a cache on a frozen value: same mask, more lists
            object.__setattr__(self, "q_counts", q_counts)
        return self

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, nq = self.kv_counts.shape
        return b, h, nq, -(-self.seq_k // self.block)

    def to_block_bool(self) -> Tensor:
        b, h, nq, nk = self.shape
        keep = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool, device=self.kv_indices.device)
        idx = torch.where(self.kv_indices >= 0, self.kv_indices, nk).long()
        keep.scatter_(-1, idx, True)
        return keep[..., :nk]

    def to_dense(self) -> Tensor:
        """Token-level (B, H, seq_q, seq_k) bool mask (for references and tests; O(S^2) memory)."""
        keep = self.to_block_bool()
        keep = keep.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)
        return keep[..., : self.seq_q, : self.seq_k]

    def density(self) -> float:
        """Share of (query block, key block) pairs kept."""
        b, h, nq, nk = self.shape
        return float(self.kv_counts.sum()) / (b * h * nq * nk)

    def to(self, device: torch.device | str) -> "BlockMask":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockMask(move(self.kv_indices), move(self.kv_counts), move(self.q_indices), move(self.q_counts),
                         self.block, self.seq_q, self.seq_k)


def causal_blocks(nq: int, nk: int, block: int, seq_q: int, seq_k: int, device: torch.device | str = "cpu") -> Tensor:
    """(nq, nk) bool: blocks holding at least one (query, key) pair with key <= query + (seq_k - seq_q)."""
    offset = seq_k - seq_q  # bottom-right aligned, as for a query chunk at the end of a KV cache
    first_q = torch.arange(nq, device=device) * block
    last_q = torch.clamp(first_q + block - 1, max=seq_q - 1)
    first_k = torch.arange(nk, device=device) * block
    return first_k[None, :] <= (last_q + offset)[:, None]
