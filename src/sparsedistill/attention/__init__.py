"""Sparse attention kernels with a PyTorch reference beside each.

- block-sparse attention over compact ``BlockMask`` lists (forward and backward), and ASA masks
  chosen from pooled block scores (Video-BLADE);
- top-k token attention with a lightning indexer (DeepSeek Sparse Attention), whose indices a
  later layer can reuse (IndexCache).
"""

from .asa import AdaptiveBlockSparseAttention, ASAConfig, asa_mask, pool_blocks, pool_reference
from .block_mask import SUPPORTED_BLOCKS, BlockMask
from .block_sparse import SUPPORTED_HEAD_DIMS, attention_reference, block_sparse_attention
from .topk import indexer_scores, indexer_scores_reference, indexer_topk, topk_attention, topk_attention_reference

__all__ = [
    "AdaptiveBlockSparseAttention", "ASAConfig", "asa_mask", "pool_blocks", "pool_reference", "SUPPORTED_BLOCKS", "BlockMask",
    "SUPPORTED_HEAD_DIMS", "attention_reference", "block_sparse_attention",
    "indexer_scores", "indexer_scores_reference", "indexer_topk", "topk_attention", "topk_attention_reference",
]
