"""Inference-free learned sparse retrieval: IDF-weighted queries, SPLADE-style documents, FLOPS regularisers."""

from .flops import flops_loss, flops_weight
from .idf import IDFTable
from .encoders import QueryEncoder, SparseDocEncoder
from .index import IndexCorruptError, SparseIndex

__all__ = ["IDFTable", "IndexCorruptError", "QueryEncoder", "SparseDocEncoder", "SparseIndex", "flops_loss", "flops_weight"]
