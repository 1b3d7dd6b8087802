"""A run directory: resolved config, metrics as JSON lines, atomic checkpoints and job results.

Layout::

    <run>/config.toml          the resolved config
    <run>/environment.json     versions and git commit when the run started, and of its last resumes
    <run>/metrics.jsonl        one JSON object per logged step, tagged with its job
    <run>/checkpoints/<job>.pt model/optimizer/step, written atomically; the last one stays (a finished
                               job's weights, which later stages and resumed runs reload)
    <run>/results/<job>.json   a finished job's outputs; its presence means "skip on --resume"
    <run>/report.md, *.png     written by the recipe

Only rank 0 writes; every rank reads, so all ranks skip the same finished jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import re
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from . import distributed as dist
from .config import config_to_dict, dump_toml, load_config

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_torch_save", "environment", "Run", "latest_run",
           "check_mergeable"]


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """A file that replaces ``path`` only if the block finishes: temporary file in the same directory, fsync, rename.

    A crash or an exception inside the block leaves ``path`` as it was. Text modes write UTF-8 with "\n" newlines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make results unreadable to other users
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_config(saved: Path, config: Any) -> bool:
    """Whether ``config`` is the one a run was started with: the same text, or the same once the saved file is read
    with today's defaults (a key added to the code since, left at its default, does not stop a resume)."""
    text = dump_toml(config)
    if saved.read_text() == text:
        return True
    try:
        return dump_toml(load_config(type(config), saved)) == text
    except (ValueError, TypeError):  # a key removed or retyped since: not the same config
        return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cpu_name() -> str:
    """The processor and the vector ISA torch dispatches to: CPU float results (and so a mined training set's
    near-ties) differ between an AVX2 and an AVX-512 host, so a run names the one it had."""
    model = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in info[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        ids = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)  # Intel's family is 6 for all
        model = fields.get("model name", model) + (f" ({ids})" if ids else "")
    except OSError:
        pass
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def environment() -> dict[str, str]:
    """Versions and commit, recorded with every report and benchmark."""
    import numpy

    try:
        # Ask the package's own checkout, not whatever repository the caller stands in.
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)  # noqa: E731
        head = git("rev-parse", "--short", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else ""
        if commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip():
            commit += "+uncommitted changes"
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        # A copy without its .git (a GPU machine) names its commit in SPARSEDISTILL_COMMIT.
        "commit": os.environ.get("SPARSEDISTILL_COMMIT") or commit or "unknown",
    }


_KEPT_RESUMES = 20  # environment.json keeps the last ones: a sweep resumed every call stays readable


def _job_file(job: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", job):
        raise ValueError(f"job name {job!r} must use letters, digits, '_', '.', '-' only")
    return job


def latest_run(root: Path, prefix: str) -> Path | None:
    runs = sorted(p for p in root.glob(f"{prefix}-*") if (p / "config.toml").exists())
    return runs[-1] if runs else None


class Run:
    """Handle on a run directory.

    Without ``resume`` the directory must not hold results or checkpoints yet, so an existing
    checkpoint is always this run's own and loading it is what resuming means.
    """

    def __init__(self, path: str | os.PathLike, config: Any, resume: bool = False, command: str = "") -> None:
        self.path = Path(path)
        self.resume = resume
        if not resume and any(any((self.path / sub).glob("*")) for sub in ("results", "checkpoints") if (self.path / sub).is_dir()):
            raise FileExistsError(f"{self.path} already holds results or checkpoints; pass --resume to continue it or choose another --run-dir")
        saved = self.path / "config.toml"
        if resume and saved.exists() and not _same_config(saved, config):
            raise ValueError(
                f"the config differs from the one {self.path} was started with ({saved}); "
                "resume with the same config, or start a new run"
            )
        if dist.is_main():
            for sub in ("checkpoints", "results"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            if not (resume and saved.exists()):  # a resumed run keeps the record of what it was started with
                atomic_write_bytes(self.path / "config.toml", dump_toml(config).encode())
            start = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "started_unix": time.time()}
            env_file = self.path / "environment.json"
            if not env_file.exists():
                atomic_write_bytes(env_file, json.dumps({**start, **environment()}, indent=1).encode())
            elif resume:  # a resumed run may finish on another machine or commit: its report names both
                first = json.loads(env_file.read_text())
                resumes = first.get("resumes", [])[-(_KEPT_RESUMES - 1):] + [{**start, **environment()}]
                atomic_write_bytes(env_file, json.dumps({**first, "resumes": resumes}, indent=1).encode())
        dist.barrier()

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        """A finished (or running) run, read-only: for reports; writes nothing, checks no config."""
        run = cls.__new__(cls)
        run.path, run.resume = Path(path), True
        return run

    def environment(self) -> dict[str, Any]:
        """Command, start time, versions and commit recorded when the run started (``resumes``: the same of each
        later --resume, the last few)."""
        f = self.path / "environment.json"
        return json.loads(f.read_text()) if f.exists() else environment()

    def elapsed_seconds(self) -> float | None:
        """From the run's start to its last finished job (spans any --resume)."""
        start = self.environment().get("started_unix")
        done = [p.stat().st_mtime for p in (self.path / "results").glob("*.json")]
        return max(done) - start if start and done else None

    # metrics ---------------------------------------------------------------------------------
    def log(self, job: str, step: int, **metrics: float) -> None:
        if not dist.is_main():
            return
        row = {"job": job, "step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self, job: str | None = None) -> list[dict[str, Any]]:
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return []
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines[:-1]]
        if lines:  # the last line may be another process's append caught halfway (--jobs side by side): skip it
            try:
                rows.append(json.loads(lines[-1]))
            except json.JSONDecodeError:
                pass
        # A resumed job logs again the steps after its last checkpoint; the later row wins.
        latest = {(r["job"], r["step"]): r for r in rows if job is None or r["job"] == job}
        return list(latest.values())

    # checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self, job: str) -> Path:
        return self.path / "checkpoints" / f"{_job_file(job)}.pt"

    def save_checkpoint(self, job: str, state: dict[str, Any], sync: bool = True) -> None:
        """Rank 0 writes; ``sync`` as in ``save_result``."""
        if dist.is_main():
            atomic_torch_save(state, self.checkpoint_path(job))
        if sync:
            dist.barrier()

    def load_checkpoint(self, job: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(job)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    # finished jobs ---------------------------------------------------------------------------
    def result(self, job: str) -> dict[str, Any] | None:
        f = self.path / "results" / f"{_job_file(job)}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def save_result(self, job: str, result: dict[str, Any], sync: bool = True) -> None:
        """Rank 0 writes; with ``sync`` every rank calls this and waits for the file. ``sync=False``
        is for work that rank 0 does alone (the others must not be waiting in a collective of their own)."""
        if dist.is_main():
            atomic_write_bytes(self.path / "results" / f"{_job_file(job)}.json", json.dumps(result, indent=1).encode())
        if sync:
            dist.barrier()

    def artifact(self, name: str) -> Path:
        return self.path / name


def _flat(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def check_mergeable(run_dirs: Sequence[Path], config_type: type, free: Collection[tuple[str, ...]] = (),
                    free_leaves: Collection[str] = ("checkpoint_every",)) -> None:
    """Runs share one report only where their configs agree on everything but the ``free`` keys (paths, e.g.
    ``("eval", "base")``) and keys named in ``free_leaves`` at any depth: what cannot change a result (which jobs a
    run did, where its cache lives, how often it checkpointed). Each config is read through ``config_type``, so a key
    an older run did not write compares as its default."""
    flats = []
    for d in run_dirs:
        f = Path(d) / "config.toml"
        if not f.exists():
            raise FileNotFoundError(f"{d} is not a run directory (no config.toml)")
        cfg = config_to_dict(load_config(config_type, f))
        flats.append({k: v for k, v in _flat(cfg).items() if k not in free and k[-1] not in free_leaves})
    for d, flat in zip(run_dirs[1:], flats[1:]):
        diff = sorted(".".join(k) for k in set(flat) | set(flats[0]) if flat.get(k) != flats[0].get(k))
        if diff:
            may = ", ".join([*(".".join(k) for k in free), *free_leaves])
            raise ValueError(f"{d} was run with a config that differs from {run_dirs[0]}'s in {', '.join(diff)}: only "
                             f"runs that differ in {may} can share a report")
