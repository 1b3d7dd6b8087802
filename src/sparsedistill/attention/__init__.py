"""Sparse attention kernels with a PyTorch reference beside each.

- block-sparse attention over compact ``BlockMask`` lists (forward and backward), and ASA masks
  chosen from pooled block scores (Video-BLADE);
- top-k token attention with a lightning indexer (DeepSeek Sparse Attention), whose indices a
  later layer can reuse (IndexCache).
"""

from .asa import (AdaptiveBlockSparseAttention, ASAConfig, asa_attention, asa_mask, asa_mask_reference, pool_blocks,
                  pool_reference, pooled_kv_attention)
from .block_mask import SUPPORTED_BLOCKS, BlockMask
from .token_order import from_tile_order, tile_order, to_tile_order
from .block_sparse import SUPPORTED_HEAD_DIMS, attention_reference, block_sparse_attention
from .topk import indexer_scores, indexer_scores_reference, indexer_topk, topk_attention, topk_attention_reference

__all__ = [
    "AdaptiveBlockSparseAttention", "ASAConfig", "asa_attention", "asa_mask", "asa_mask_reference", "pool_blocks",
    "pool_reference", "pooled_kv_attention", "tile_order", "to_tile_order", "from_tile_order", "SUPPORTED_BLOCKS", "BlockMask",
    "SUPPORTED_HEAD_DIMS", "attention_reference", "block_sparse_attention",
    "indexer_scores", "indexer_scores_reference", "indexer_topk", "topk_attention", "topk_attention_reference",
]
