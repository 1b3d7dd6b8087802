"""Sparse attention: block-sparse masks and kernels (and, with their issues, ASA and top-k token attention)."""

from .asa import asa_mask, pool_blocks, pool_reference
from .block_mask import SUPPORTED_BLOCKS, BlockMask
from .block_sparse import SUPPORTED_HEAD_DIMS, attention_reference, block_sparse_attention

__all__ = ["asa_mask", "pool_blocks", "pool_reference", "SUPPORTED_BLOCKS", "SUPPORTED_HEAD_DIMS", "BlockMask", "attention_reference", "block_sparse_attention"]
