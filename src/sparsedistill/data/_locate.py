"""Find datasets offline first: an environment variable, then the installed package, then the cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DatasetNotFound", "locate"]


class DatasetNotFound(FileNotFoundError):
    """A dataset is neither installed nor downloadable; the message says what to install."""


def locate(env_var: str, candidates: list[Path], required: list[str]) -> Path | None:
    """First directory holding every file in ``required``: ``$env_var``, then ``candidates``."""
    dirs = ([Path(os.environ[env_var])] if os.environ.get(env_var) else []) + candidates
    for d in dirs:
        if all((d / f).exists() for f in required):
            return d
    if os.environ.get(env_var):
        missing = [f for f in required if not (Path(os.environ[env_var]) / f).exists()]
        raise DatasetNotFound(f"${env_var}={os.environ[env_var]} is missing {missing}")
    return None


def cache_dir(name: str) -> Path:
    root = Path(os.environ.get("SPARSEDISTILL_CACHE", Path.home() / ".cache" / "sparsedistill"))
    return root / name
