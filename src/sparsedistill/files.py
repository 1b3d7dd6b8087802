"""File helpers every subpackage may use (no torch): content hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: str | Path, into: "hashlib._Hash | None" = None) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks; ``into`` feeds an existing hash (several files) instead."""
    h = into if into is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
