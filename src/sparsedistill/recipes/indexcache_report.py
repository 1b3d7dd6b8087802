"""Report of ``indexcache run``: dense vs DSA perplexity, IndexCache patterns against the targets, overlaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..report import markdown_table, plt, save_figure, command_line
from ..runs import Run, atomic_write_bytes

__all__ = ["write_report"]


def _results(run: Run) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in sorted((run.path / "results").glob("*.json"))}


def write_report(run: Run) -> Path:
    res = _results(run)
    env = run.environment()
    dense, dsa = res["dense-ppl"]["perplexity"], res["dsa-ppl"]["perplexity"]
    contexts = list(dense)
    md = ["# IndexCache on SmolLM2-135M: DSA top-k attention and shared indexers", "",
          command_line(env), "",
          "## Dense vs DSA (every layer its own indexer)", "",
          markdown_table(["context", "dense ppl", "DSA ppl", "DSA / dense", "target <= 1.03 at 4K+"],
                         [[c, f"{dense[c]:.3f}", f"{dsa[c]:.3f}", f"{dsa[c] / dense[c]:.4f}",
                           ("met" if dsa[c] / dense[c] <= 1.03 else "missed") if int(c) >= 4096 else "-"] for c in contexts]), ""]
    patterns = sorted((r for k, r in res.items() if k.startswith("pattern-")), key=lambda r: (-r["n_full"], r["method"]))
    if patterns:
        rows = []
        for r in patterns:
            rows.append([r["method"], r["n_full"], f"`{r['pattern']}`", *[f"{r['perplexity'][c]:.3f} ({r['perplexity'][c] / dsa[c]:.4f})" for c in contexts],
                         f"{r['calibration_loss']:.4f}"])
        md += ["## IndexCache patterns", "", "Perplexity (and its ratio to full DSA) on the test split; F = own indexer, S = reuses the last F.", "",
               markdown_table(["method", "Full layers", "pattern", *[f"ppl @ {c}" for c in contexts], "calibration loss"], rows), ""]
    overlap = res["dsa-ppl"].get("adjacent_overlap")
    if overlap:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(1, len(overlap) + 1), [100 * o for o in overlap])
        ax.set_xlabel("layer l (vs layer l-1)")
        ax.set_ylabel("top-k overlap (%)")
        md += [f"Adjacent-layer top-k overlap: mean {100 * np.mean(overlap):.1f} %, range {100 * min(overlap):.1f}-{100 * max(overlap):.1f} % "
               "(the paper: 70-100 %).", "", f"![overlap]({save_figure(fig, run.path / 'overlap.png')})", ""]
    report = run.path / "report.md"
    atomic_write_bytes(report, "\n".join(md).encode())
    return report
