"""Unsupervised pseudo-queries from documents, for pre-training without MS MARCO.

Each pseudo-query is cut from one document, which becomes its positive: a ``sentence`` of the
text, the ``title``, or a random ``crop`` of consecutive words (Contriever-style). Draws depend
only on ``(seed, document id, kind)``, so the same corpus gives the same queries on any machine
and in any order, and a teacher-score cache built from them stays valid.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..data.beir import ir_data_root
from ..data._locate import DatasetNotFound

__all__ = ["PSEUDO_KINDS", "PseudoQuery", "load_documents", "pseudo_queries"]

PSEUDO_KINDS = ("sentence", "title", "crop")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PseudoQuery:
    doc_id: str
    kind: str
    text: str


def load_documents(name_or_path: str | Path) -> dict[str, tuple[str, str]]:
    """``doc id -> (title, text)`` of a BEIR-layout corpus (``load_beir`` joins the two; pseudo-queries need the title alone)."""
    path = Path(name_or_path)
    if not path.is_dir():
        path = ir_data_root() / str(name_or_path)
    f = path / "corpus.jsonl"
    if not f.exists():
        raise DatasetNotFound(f"{path} is not a BEIR-layout collection (no corpus.jsonl)")
    out = {}
    with open(f, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                out[d["_id"]] = (d.get("title", "") or "", d.get("text", "") or "")
    return out


def _sentence(text: str, rng: random.Random, min_words: int, max_words: int) -> str | None:
    sents = [s.split() for s in _SENTENCE_END.split(text)]
    ok = [s for s in sents if len(s) >= min_words]
    if not ok:
        return None
    return " ".join(rng.choice(ok)[:max_words])


def _crop(text: str, rng: random.Random, min_words: int, max_words: int) -> str | None:
    words = text.split()
    if len(words) < min_words:
        return None
    n = rng.randint(min_words, min(max_words, len(words)))
    start = rng.randint(0, len(words) - n)
    return " ".join(words[start : start + n])


def pseudo_queries(
    docs: Mapping[str, tuple[str, str]],
    kinds: Sequence[str] = PSEUDO_KINDS,
    seed: int = 0,
    min_words: int = 4,
    max_words: int = 24,
) -> list[PseudoQuery]:
    """One pseudo-query per document and kind, where the document allows it (no title, too short: skipped).

    Documents are visited in sorted id order, so the output is independent of the mapping's order.
    """
    bad = set(kinds) - set(PSEUDO_KINDS)
    if bad or not kinds:
        raise ValueError(f"pseudo-query kinds {sorted(bad) or 'empty'}; choose from {list(PSEUDO_KINDS)}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    out = []
    for doc_id in sorted(docs):
        title, text = docs[doc_id]
        for kind in kinds:
            rng = random.Random(f"{seed}:{doc_id}:{kind}")  # str seeds hash with SHA-512: stable across processes
            if kind == "title":
                q = " ".join(title.split()[:max_words]) if len(title.split()) >= min(2, min_words) else None
            elif kind == "sentence":
                q = _sentence(text, rng, min_words, max_words)
            else:
                q = _crop(text, rng, min_words, max_words)
            if q:
                out.append(PseudoQuery(doc_id, kind, q))
    return out
