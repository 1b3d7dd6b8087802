"""Fashion-MNIST, offline first.

Looked up in order: ``$SPARSEDISTILL_FASHION_MNIST``, the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), the user cache
(``~/.cache/sparsedistill/fashion-mnist``), and finally the official download, which needs
internet. Files are the original idx ``.gz`` files.
"""

from __future__ import annotations

import gzip
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._locate import DatasetNotFound, cache_dir, locate

__all__ = ["FashionMNIST", "load_fashion_mnist", "load_fashion_mnist_split", "CLASSES"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ENV = "SPARSEDISTILL_FASHION_MNIST"


@dataclass
class FashionMNIST:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28); labels int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: Path
    classes: tuple[str, ...] = CLASSES


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # unsigned-byte idx files only
        raise ValueError(f"{path} is not an idx ubyte file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _download(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for name in FILES.values():
            if not (dest / name).exists():
                tmp = dest / f".{name}.part"
                with urllib.request.urlopen(URL + name, timeout=30) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
                tmp.replace(dest / name)
    except OSError as e:
        raise DatasetNotFound(
            "Fashion-MNIST not found offline and the download failed "
            f"({e}). Install it with `apt-get install dataset-fashion-mnist` (Debian), or put the four "
            f"idx .gz files in a folder and set ${ENV} to it."
        ) from e
    return dest


def _root(required: list[str], download: bool) -> Path:
    """The folder holding ``required`` (see the module's lookup order)."""
    root = locate(ENV, [DEBIAN_DIR, cache_dir("fashion-mnist")], required)
    if root is None:
        if not download:
            raise DatasetNotFound(
                f"Fashion-MNIST not found: install the Debian package `dataset-fashion-mnist` "
                f"(apt-get install dataset-fashion-mnist) or set ${ENV} to a folder with {required}"
            )
        root = _download(cache_dir("fashion-mnist"))
    return root


def _images(a: np.ndarray) -> Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)


def load_fashion_mnist(
    train_subset: int = 0,
    test_subset: int = 0,
    download: bool = True,
) -> FashionMNIST:
    """Load Fashion-MNIST; ``*_subset > 0`` keeps a class-balanced prefix of that many rows."""
    root = _root(list(FILES.values()), download)
    arrays = {k: _read_idx(root / f) for k, f in FILES.items()}
    data = FashionMNIST(
        _images(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        _images(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64)), root,
    )
    if train_subset:
        keep = _balanced(data.train_y, train_subset)
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    if test_subset:
        keep = _balanced(data.test_y, test_subset)
        data.test_x, data.test_y = data.test_x[keep], data.test_y[keep]
    return data


def load_fashion_mnist_split(split: str, download: bool = True) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) in [0, 1] and labels of one split, ``train`` or ``test``: only that split's two files
    need be there (a machine that only evaluates gets the 4 MB test split, not the 26 MB training set)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [FILES[f"{split}_images"], FILES[f"{split}_labels"]]
    root = _root(names, download)
    return _images(_read_idx(root / names[0])), torch.from_numpy(_read_idx(root / names[1]).astype(np.int64))


def _balanced(labels: Tensor, n: int) -> Tensor:
    """First ``n // classes`` rows of each class, in dataset order (deterministic)."""
    classes = int(labels.max()) + 1
    per = max(1, n // classes)
    rows = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in range(classes)])
    return rows.sort().values
