"""Offline-first dataset loaders; each finds its packaged copy or names the package to install."""

from ._locate import DatasetNotFound
from .fashion_mnist import FashionMNIST, load_fashion_mnist, load_fashion_mnist_split

__all__ = ["DatasetNotFound", "FashionMNIST", "load_fashion_mnist", "load_fashion_mnist_split"]
