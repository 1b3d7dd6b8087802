"""The BM25 baseline's library, imported so that it leaves the GPU to PyTorch."""

from __future__ import annotations

import os
from types import ModuleType


def import_bm25s() -> ModuleType:
    """``bm25s`` (PyPI ``bm25s``), with JAX's GPU preallocation off.

    bm25s imports JAX when it is installed and runs a top-k at import time; JAX then takes 75 % of the
    GPU's memory (105 GB of an H200's 140, seen on 2026-12-02), and the next PyTorch training step in the
    same process runs out of memory. A user's own ``XLA_PYTHON_CLIENT_PREALLOCATE`` is kept.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import bm25s
    except ImportError as e:
        raise ImportError("the BM25 baseline needs bm25s: pip install bm25s==0.3.16") from e
    return bm25s
