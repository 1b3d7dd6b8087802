"""Weight sparsity: masks and sparsifiers (unstructured magnitude, N:M)."""

from .pruning import MagnitudeSparsifier, MaskSet, NMSparsifier, is_nm_sparse, nm_mask, prunable_linears

__all__ = ["MagnitudeSparsifier", "MaskSet", "NMSparsifier", "is_nm_sparse", "nm_mask", "prunable_linears"]
