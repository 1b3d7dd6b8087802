"""Inference-free learned sparse retrieval: IDF-weighted queries, SPLADE-style documents, FLOPS regularisers, training."""

from .flops import flops_loss, flops_weight
from .idf import IDFTable
from .encoders import QueryEncoder, SparseDocEncoder
from .term_weights import QueryTermWeights, fit_term_weights
from .index import IndexCorruptError, SparseIndex
from .losses import info_nce_loss, kl_ranking_loss, margin_mse_loss, ranking_loss
from .pseudo_queries import PseudoQuery, pseudo_queries
from .train_data import TrainExample, check_no_test_leakage

__all__ = ["IDFTable", "IndexCorruptError", "QueryEncoder", "QueryTermWeights", "SparseDocEncoder", "SparseIndex", "flops_loss", "flops_weight",
           "PseudoQuery", "TrainExample", "check_no_test_leakage", "info_nce_loss", "kl_ranking_loss", "margin_mse_loss",
           "fit_term_weights", "pseudo_queries", "ranking_loss"]
