"""Small helpers shared by test files (imported as ``_helpers``: pytest puts tests/ on the path)."""


class Stop(Exception):
    """Raised by ``crash_after`` to simulate a run killed mid-training."""


def crash_after(loss_fn, calls: int):
    """``loss_fn`` that raises ``Stop`` on its ``calls + 1``-th call: a run that dies after a checkpoint."""
    seen = [0]

    def loss(net, batch):
        seen[0] += 1
        if seen[0] > calls:
            raise Stop
        return loss_fn(net, batch)

    return loss


TIMING_KEYS = ("seconds", "time", "wall", "latency", "per_s", "_ms")


def redo_jobs(run_dir, jobs, rerun, checkpoints=()) -> tuple[dict, dict]:
    """Every job is a function of its config alone: delete ``jobs``' results and checkpoints (and the extra
    ``checkpoints``) from a finished run, ``rerun()`` it (the jobs before them are then loaded, not trained, in this
    process), and return the results (before, after) with timings left out, for an exact comparison."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)

    def load(job):
        return _without_timings(json.loads((run_dir / "results" / f"{job}.json").read_text()))

    before = {j: load(j) for j in jobs}
    for j in jobs:
        (run_dir / "results" / f"{j}.json").unlink()
    for j in (*jobs, *checkpoints):
        for ckpt in (run_dir / "checkpoints").glob(f"{j}.*"):
            ckpt.unlink()
    rerun()
    return before, {j: load(j) for j in jobs}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


TOPICS = ["volcano lava eruption", "protein folding enzyme", "football goal stadium", "violin orchestra concert",
          "glacier ice melting", "bitcoin blockchain ledger"]


def topic_collection(root):
    """A BEIR-layout collection of six one-topic documents (d0..d5) and one query ("volcano" -> d0) under ``root``."""
    import json
    from pathlib import Path

    col = Path(root)
    (col / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": t, "text": f"A document about {t}."} for i, t in enumerate(TOPICS)]
    (col / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (col / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "volcano"}))
    (col / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    return col


def cranfield_subset(root, docs: int):
    """Cranfield's first ``docs`` documents and all its queries, as a BEIR-layout collection under ``root``
    (the test is skipped where the offline collections are missing)."""
    import json
    import shutil
    from pathlib import Path

    import pytest

    from sparsedistill.data import DatasetNotFound
    from sparsedistill.data.beir import ir_data_root

    try:
        src = ir_data_root() / "cranfield"
    except DatasetNotFound as e:
        pytest.skip(str(e))  # the collections live beside the checkout (shared/data/ir), not in it
    col = Path(root)
    (col / "qrels").mkdir(parents=True)
    lines = (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:docs]
    (col / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(src / "queries.jsonl", col / "queries.jsonl")
    (col / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\n1\t{json.loads(lines[0])['_id']}\t1\n")
    return col
