"""Retrieval test collections in BEIR layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).

The collections of ``../shared/data/ir`` (SciFact, Vaswani, Cranfield) are found through
``$SPARSEDISTILL_IR_DATA`` or a ``shared/data/ir`` folder next to the checkout; any folder in
the same layout (e.g. an unzipped BEIR download) works by path.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ._locate import DatasetNotFound

__all__ = ["BeirCollection", "load_beir", "ir_data_root"]


@dataclass
class BeirCollection:
    name: str
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: gain}

    def judged_queries(self) -> dict[str, str]:
        return {q: t for q, t in self.queries.items() if q in self.qrels}


def ir_data_root() -> Path:
    env = os.environ.get("SPARSEDISTILL_IR_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" / "ir" for p in here.parents]  # a checkout beside ../shared
    for c in candidates:
        if c.is_dir():
            return c
    raise DatasetNotFound("no retrieval collections found: set $SPARSEDISTILL_IR_DATA to a folder of BEIR-layout "
                          "collections (e.g. BEIR's scifact.zip, unzipped)")


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_beir(name_or_path: str | Path, split: str = "test") -> BeirCollection:
    path = Path(name_or_path)
    if not path.is_dir():
        path = ir_data_root() / str(name_or_path)
    if not (path / "corpus.jsonl").exists():
        raise DatasetNotFound(f"{path} is not a BEIR-layout collection (no corpus.jsonl)")
    qrels_file = path / "qrels" / f"{split}.tsv"
    if not qrels_file.exists():
        have = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
        raise DatasetNotFound(f"{path.name} has no '{split}' qrels; it has {have}")
    corpus = {d["_id"]: f"{d.get('title', '')} {d['text']}".strip() for d in _jsonl(path / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in _jsonl(path / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_file, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return BeirCollection(path.name, corpus, queries, qrels)
