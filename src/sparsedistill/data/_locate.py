"""Find datasets offline first: an environment variable, then the installed package, then the cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DatasetNotFound", "locate"]


class DatasetNotFound(FileNotFoundError):
    """A dataset is neither installed nor downloadable; the message says what to install."""


def locate(env_var: str, candidates: list[Path], required: list[str]) -> Path | None:
    """Directory holding every file in ``required``: ``$env_var`` if set (authoritative), else the first candidate."""
    override = os.environ.get(env_var)
    if override:
        missing = [f for f in required if not (Path(override) / f).exists()]
        if missing:
            raise DatasetNotFound(f"${env_var}={override} is missing {missing}")
        return Path(override)
    for d in candidates:
        if all((d / f).exists() for f in required):
            return d
    return None


def cache_dir(name: str) -> Path:
    root = Path(os.environ.get("SPARSEDISTILL_CACHE", Path.home() / ".cache" / "sparsedistill"))
    return root / name
