"""Inference-free learned sparse retrieval: IDF-weighted queries, SPLADE-style documents, FLOPS regularisers."""

from .flops import flops_loss, flops_weight
from .idf import IDFTable
from .encoders import QueryEncoder, SparseDocEncoder

__all__ = ["IDFTable", "QueryEncoder", "SparseDocEncoder", "flops_loss", "flops_weight"]
