"""Small helpers shared by every recipe's report: seed statistics, markdown tables, PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are written headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["mean_std", "fmt_mean_std", "markdown_table", "save_figure", "environment_line", "command_line", "plt"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if len(values) > 1 else f"{m * scale:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> str:
    """Save a matplotlib figure as PNG and return its file name (for a markdown link)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def environment_line(env: dict[str, Any]) -> str:
    """The run's versions, card and commit as one sentence fragment (``Run.environment()`` minus command and start)."""
    return ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("command", "started", "started_unix", "resumes"))


def command_line(env: dict[str, Any]) -> str:
    """'Command: `...` (started ...); <environment>.' for the top of a report, and the same of the last --resume
    where it ran elsewhere (another card, commit or version: a run finished on a GPU after starting on a CPU)."""
    line = f"Command: `{env.get('command', '')}` (started {env.get('started', '?')}); {environment_line(env)}."
    last = (env.get("resumes") or [None])[-1]
    if last and environment_line(last) != environment_line(env):
        line += (f" Last resumed by `{last.get('command', '')}` (started {last.get('started', '?')}); "
                 f"{environment_line(last)}.")
    return line
