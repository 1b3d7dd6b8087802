"""Sparse attention kernels with a PyTorch reference beside each.

- block-sparse attention over compact ``BlockMask`` lists (forward and backward), and ASA masks
  chosen from pooled block scores (Video-BLADE);
- top-k token attention with a lightning indexer (DeepSeek Sparse Attention), whose indices a
  later layer can reuse (IndexCache).
"""

import importlib

from .block_mask import SUPPORTED_BLOCKS, BlockMask
from .token_order import from_tile_order, tile_order, to_tile_order

# The kernels' modules import Triton (Linux only) and are loaded on first use, so that models importing the
# pure-PyTorch pieces (rope, token_order) do not need Triton.
_LAZY = {
    **dict.fromkeys(("AdaptiveBlockSparseAttention", "ASAConfig", "asa_attention", "asa_mask", "asa_mask_reference",
                     "pool_blocks", "pool_reference", "pooled_kv_attention"), "asa"),
    **dict.fromkeys(("SUPPORTED_HEAD_DIMS", "attention_reference", "block_sparse_attention"), "block_sparse"),
    **dict.fromkeys(("indexer_scores", "indexer_scores_reference", "indexer_topk", "topk_attention",
                     "topk_attention_reference"), "topk"),
    **dict.fromkeys(("indexer_topk_prefilter", "indexer_topk_sorted_reference"), "indexer_select"),
    **dict.fromkeys(("GroupUnion", "TopkSelection", "group_union", "topk_attention_union", "union_ratio",
                     "sampled_union_ratio"), "topk_union"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaptiveBlockSparseAttention", "ASAConfig", "asa_attention", "asa_mask", "asa_mask_reference", "pool_blocks",
    "pool_reference", "pooled_kv_attention", "tile_order", "to_tile_order", "from_tile_order", "SUPPORTED_BLOCKS", "BlockMask",
    "SUPPORTED_HEAD_DIMS", "attention_reference", "block_sparse_attention",
    "indexer_scores", "indexer_scores_reference", "indexer_topk", "topk_attention", "topk_attention_reference",
    "indexer_topk_prefilter", "indexer_topk_sorted_reference",
    "GroupUnion", "TopkSelection", "group_union", "topk_attention_union", "union_ratio", "sampled_union_ratio",
]
