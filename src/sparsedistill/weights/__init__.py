"""Weight sparsity and quantisation: masks, sparsifiers (magnitude, N:M), 2:4 channel permutations, fake-quant."""

from .permutation import PermutationResult, kept_magnitude, permute_linear_pair, search_permutation
from .pruning import MagnitudeSparsifier, MaskSet, NMSparsifier, is_nm_sparse, nm_mask, prunable_linears
from .quant import QuantLinear, calibrate, fake_quant, swap_linears

__all__ = [
    "MagnitudeSparsifier", "MaskSet", "NMSparsifier", "is_nm_sparse", "nm_mask", "prunable_linears",
    "PermutationResult", "kept_magnitude", "permute_linear_pair", "search_permutation",
    "QuantLinear", "calibrate", "fake_quant", "swap_linears",
]
