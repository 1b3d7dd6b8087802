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
