import json

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Two xdist workers on two cores: one thread each, or OpenMP oversubscription makes both crawl.
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the torchrun test's subprocesses


@pytest.fixture
def tiny_collection(tmp_path):
    """8 one-topic documents; queries 0-3 are test queries, 4-7 train queries (query 7 repeats test query 0's text)."""
    col = tmp_path / "tiny"
    (col / "qrels").mkdir(parents=True)
    topics = ["volcano lava eruption", "protein folding enzyme", "football goal stadium", "violin orchestra concert",
              "glacier ice melting", "bitcoin blockchain ledger", "tomato garden soil", "rocket orbit launch"]
    docs = [{"_id": f"d{i}", "title": t.title(), "text": f"A long document about {t}. It says more about {t.split()[0]} and {t.split()[1]}."}
            for i, t in enumerate(topics)]
    (col / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    texts = [t.split()[0] + " " + t.split()[2] for t in topics[:7]] + [topics[0].split()[0] + " " + topics[0].split()[2]]
    (col / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": x}) for i, x in enumerate(texts)))
    (col / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    (col / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i % 8}\t1\n" for i in range(4, 8)))
    return col
