"""Teacher-output cache: run the teacher once per dataset, keep its top-k logits on disk.

Layout of a cache directory::

    meta.json      {"num_rows", "k", "num_classes", "fingerprint"}
    indices.npy    (num_rows, k) int16/int32, classes sorted by logit, descending
    logits.npy     (num_rows, k) float32 top-k logits
    logsumexp.npy  (num_rows,)   float32 log-partition of the full logits

The arrays are memory-mapped, so a cache larger than RAM works. Top-k log-probabilities at
``T = 1`` are exact (``logit - logsumexp``); with ``k == num_classes`` the cache is lossless up
to float32 rounding. The directory is built under a temporary name and renamed when complete, so an
interrupted build never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .losses import Operator
from .teachers import SparseTargets, truncated_targets

__all__ = ["TeacherCache"]


def _np_rows(rows: Tensor | slice) -> np.ndarray | slice:
    return rows.cpu().numpy() if isinstance(rows, Tensor) else rows


class TeacherCache:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no teacher cache at {self.path} (build it with TeacherCache.build)")
        self.meta = json.loads(meta_file.read_text())
        self.indices = np.load(self.path / "indices.npy", mmap_mode="r")
        self.logits = np.load(self.path / "logits.npy", mmap_mode="r")
        self.logsumexp = np.load(self.path / "logsumexp.npy", mmap_mode="r")

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return int(self.meta["num_rows"])

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        teacher: Callable[[Tensor], Tensor],
        inputs: Tensor,
        k: int,
        *,
        batch_size: int = 1024,
        fingerprint: str = "",
        progress: bool = True,
    ) -> "TeacherCache":
        """Run ``teacher`` over ``inputs`` in batches and store its top-k outputs at ``path``.

        If a complete cache with the same ``fingerprint`` exists it is reused, so callers can
        always call ``build``; a different fingerprint rebuilds it.
        """
        path = Path(path)
        if (path / "meta.json").exists():
            cache = cls(path)
            if cache.meta.get("fingerprint") == fingerprint and len(cache) == len(inputs) and cache.k == k:
                return cache
            shutil.rmtree(path)
        n = len(inputs)
        if n == 0:
            raise ValueError("cannot build a teacher cache over an empty dataset")
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        indices = logits = lse = None
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc="teacher cache", disable=not progress, leave=False):
                out = teacher(inputs[start : start + batch_size]).float().cpu()
                if out.ndim != 2:
                    raise ValueError(f"teacher must return (batch, classes) logits, got {tuple(out.shape)}")
                if not torch.isfinite(out).all():
                    raise ValueError("teacher returned NaN/inf logits; refusing to cache them")
                C = out.shape[1]
                if not 1 <= k <= C:
                    raise ValueError(f"cache top-k must be in [1, {C}], got {k}")
                if indices is None:
                    idx_dtype = np.int16 if C <= np.iinfo(np.int16).max else np.int32
                    indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", idx_dtype, (n, k))
                    logits = np.lib.format.open_memmap(tmp / "logits.npy", "w+", np.float32, (n, k))
                    lse = np.lib.format.open_memmap(tmp / "logsumexp.npy", "w+", np.float32, (n,))
                    num_classes = C
                top, idx = out.topk(k, dim=-1)
                stop = start + len(out)
                indices[start:stop] = idx.numpy().astype(indices.dtype)
                logits[start:stop] = top.numpy()
                lse[start:stop] = torch.logsumexp(out, -1).numpy()
        for arr in (indices, logits, lse):
            arr.flush()
        del indices, logits, lse
        meta = {"num_rows": n, "k": k, "num_classes": num_classes, "fingerprint": fingerprint}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, path)
        return cls(path)

    def full_logits(self, rows: Tensor | slice) -> Tensor:
        """Teacher logits when the cache is lossless (``k == num_classes``)."""
        if self.k != self.num_classes:
            raise ValueError(f"cache keeps top-{self.k} of {self.num_classes} classes; full logits are not available")
        idx = torch.from_numpy(np.array(self.indices[_np_rows(rows)])).long()
        val = torch.from_numpy(np.array(self.logits[_np_rows(rows)])).float()
        return torch.empty_like(val).scatter_(-1, idx, val)

    def topk_targets(self, rows: Tensor | slice, k: int | None = None, T: float = 1.0, operator: Operator = "power") -> SparseTargets:
        """Renormalised, softened top-``k`` targets (``k <= self.k``) for the given rows."""
        k = self.k if k is None else k
        if not 1 <= k <= self.k:
            raise ValueError(f"this cache holds top-{self.k}; asked for top-{k}")
        idx = torch.from_numpy(np.array(self.indices[_np_rows(rows)][..., :k])).long()
        logits = torch.from_numpy(np.array(self.logits[_np_rows(rows)][..., :k])).float()
        return truncated_targets(idx, logits, self.num_classes, T, operator)

    def labels(self, rows: Tensor | slice) -> Tensor:
        """The teacher's argmax class per row (what a hard-label teacher exposes)."""
        return torch.from_numpy(np.array(self.indices[_np_rows(rows)][..., 0])).long()

    def kept_mass(self, rows: Tensor | slice, k: int | None = None) -> Tensor:
        """Teacher probability mass (at T = 1) covered by the top-``k`` classes of each row."""
        k = self.k if k is None else k
        logits = torch.from_numpy(np.array(self.logits[_np_rows(rows)][..., :k])).float()
        lse = torch.from_numpy(np.array(self.logsumexp[_np_rows(rows)])).float()
        return (logits - lse.unsqueeze(-1)).exp().sum(-1)
