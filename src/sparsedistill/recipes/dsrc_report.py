"""The DSRC run's report: clean and corrupted AP per model, Robo3D's mCE / mRR, delta-AP vs B0, plots, BEV pictures."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..perception.detections import load_matches
from ..perception.metrics import paired_bootstrap_delta_seeds
from ..report import command_line
from ..runs import Run, atomic_write_bytes

__all__ = ["write_report"]


def _mean(values: list[float | None]) -> str:
    if not values or any(v is None for v in values):
        return "—"  # undefined for some seed (e.g. RR of a model whose clean AP is 0)
    if len(values) == 1:
        return f"{values[0] * 100:.1f}"
    return f"{statistics.mean(values) * 100:.1f} ± {statistics.stdev(values) * 100:.1f}"


def pooled_seed_deltas(run_of_seed: dict[int, Path], model: str, conditions: Sequence[str], rounds: int = 1000,
                       threshold: str = "ap50") -> dict[str, tuple[float, float, float]] | None:
    """delta-AP vs b0 [CI] of ``model`` per condition, averaged over the seeds of ``run_of_seed`` (each seed's run
    directory) on the same frame draws (``paired_bootstrap_delta_seeds``, bootstrap seed 0; a seed's own
    evaluation draws with its training seed). None where a seed's matched predictions are not in its run
    directory (``matches/``) or its detect jobs saw other test frames than the first seed's (their true boxes'
    sha256 differ): the report then gives the first seed's delta and says so."""
    jobs = [(run_of_seed[s], f"detect-{m}-s{s}") for s in run_of_seed for m in (model, "b0")]
    if not all((d / "matches" / f"{job}.npz").exists() and (d / "results" / f"{job}.json").exists() for d, job in jobs):
        return None
    truth = {json.loads((d / "results" / f"{job}.json").read_text()).get("truth_sha256") for d, job in jobs}
    if len(truth) > 1:
        return None
    loaded = [load_matches(d / "matches" / f"{job}.npz") for d, job in jobs]
    pairs = list(zip(loaded[0::2], loaded[1::2]))
    return {key: paired_bootstrap_delta_seeds([(a[key][threshold], b[key][threshold]) for a, b in pairs], rounds)
            for key in conditions}


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def write_report(run: Run, results: dict, recipe=None, missing: dict[int, list[str]] | None = None,
                 others: Sequence[tuple[Run, list[int]]] = (), out_dir: Path | None = None,
                 bootstrap: int | None = None) -> Path:
    """``report.md`` (tables over seeds: mean ± sd) and ``ap-vs-severity.png`` in ``out_dir`` (default: the run
    directory); ``missing``: per seed, the variants not yet detected (a partial report says so at the top);
    ``others``: further runs whose seeds' evaluations ``results`` also holds (each named at the top, with its
    seeds); the BEV pictures of every run. A model of several seeds gets delta-AP vs b0 over them all (the seeds'
    mean on the same frame draws, ``bootstrap`` rounds: default the recipe's eval.bootstrap), of one seed that
    seed's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    seeds = [s for s, r in results.items() if r is not None]
    if not seeds:
        raise ValueError(f"no evaluation in {run.path}: run `perception run` there first (it writes results/eval-s*.json)")
    first = results[seeds[0]]
    # a model may run under fewer seeds than b0 and dsrc (e.g. the ablations under the first seed only):
    # each row is over the seeds that have it, and says how many
    models = list(dict.fromkeys(m for s in seeds for m in results[s]["models"]))
    seeds_of = {m: [s for s in seeds if m in results[s]["models"]] for m in models}
    corruptions = sorted({c.rsplit("-", 1)[0] for c in first["conditions"] if c != "clean"},
                         key=[c.rsplit("-", 1)[0] for c in first["conditions"]].index)
    levels = sorted({int(c.rsplit("-", 1)[1]) for c in first["conditions"] if c != "clean"})

    def vals(m: str, key: str, t: str = "ap50") -> list[float]:
        return [results[s]["models"][m][key][t] for s in seeds_of[m]]

    run_of = {s: o.path for o, o_seeds in others for s in o_seeds}
    run_of = {s: run_of.get(s, run.path) for s in seeds}
    shown = [k for k in ["clean"] + [f"{c}-2" for c in corruptions] if k in first["conditions"]]
    rounds = bootstrap or (recipe.cfg.eval.bootstrap if recipe is not None else 1000)
    pooled = {m: pooled_seed_deltas({s: run_of[s] for s in seeds_of[m]}, m, shown, rounds) for m in models
              if m != "b0" and len(seeds_of[m]) > 1}

    def delta_of(m: str, key: str) -> list[float] | None:
        """delta-AP@0.5 vs b0 [CI]: over the model's seeds where their matches are here, else its first seed's."""
        if pooled.get(m):
            return pooled[m].get(key)
        return results[seeds_of[m][0]]["models"][m].get(key, {}).get("delta_ap50_vs_b0")

    def delta_seeds(m: str) -> str:
        return f"{len(seeds_of[m])} seeds" if pooled.get(m) else f"seed {seeds_of[m][0]}"

    lines = [f"# DSRC on simulated cooperative LiDAR ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {seeds})", "",
             command_line(run.environment()), ""]
    for other, other_seeds in others:
        where = _link(other.path, out)
        lines += [f"Seed{'s' if len(other_seeds) > 1 else ''} {', '.join(map(str, other_seeds))} from [`{where}`]({where}): "
                  + command_line(other.environment()), ""]
    not_yet = {s: ms for s, ms in (missing or {}).items() if ms}
    if not_yet:
        lines += ["**Partial report: models not yet detected**: "
                  + "; ".join(f"seed {s}: " + ", ".join(f"`{m}`" for m in ms) for s, ms in not_yet.items())
                  + ". The tables cover the models detected so far; `perception run --resume` in this run directory "
                  "trains and detects the rest, then evaluates all.", ""]
    lines += ["AP in %, BEV rotated IoU, cars seen by at least one agent, inside the ego's grid; mean ± sd over seeds. "
              "Corrupted: every agent's scan in its own frame, mean over the levels. mCE / mRR as Robo3D "
              "(CE against b0 = 100 %). Delta vs b0: paired frame bootstrap, 95 % interval; over several seeds, the mean of "
              "their deltas on the same frame draws (the interval is the frames' uncertainty; the seeds' spread is the "
              "± of the AP columns).", "",
              "| model | seeds | clean AP@0.5 | clean AP@0.7 | corrupted AP@0.5 | mCE % (AP@0.5) | mRR % (AP@0.5) | delta clean AP@0.5 vs b0 [CI] (seeds) |",
              "|---|---|---|---|---|---|---|---|"]
    for m in models:
        ms = seeds_of[m]
        corrupted = [statistics.mean(results[s]["models"][m][f"{c}-{lv}"]["ap50"] for c in corruptions for lv in levels)
                     for s in ms] if corruptions else []
        mce = [results[s]["models"][m]["mce_ap50"] for s in ms] if corruptions else []
        mrr = [results[s]["models"][m]["mrr_ap50"] for s in ms] if corruptions else []
        d = delta_of(m, "clean")
        delta = f"{d[0] * 100:+.1f} [{d[1] * 100:+.1f}, {d[2] * 100:+.1f}] ({delta_seeds(m)})" if d else "—"
        lines.append(f"| `{m}` | {len(ms)} | {_mean(vals(m, 'clean'))} | {_mean(vals(m, 'clean', 'ap70'))} | "
                     f"{_mean(corrupted)} | {_mean(mce)} | {_mean(mrr)} | {delta} |")
    if corruptions:
        lines += ["", "AP@0.5 per corruption (mean over levels) and its delta vs b0 at level 2 [CI]:", "",
                  "| model | " + " | ".join(corruptions) + " |", "|---|" + "---|" * len(corruptions)]
        for m in models:
            cells = []
            for c in corruptions:
                v = _mean([statistics.mean(results[s]["models"][m][f"{c}-{lv}"]["ap50"] for lv in levels)
                           for s in seeds_of[m]])
                d = delta_of(m, f"{c}-2")
                cells.append(v + (f" ({d[0] * 100:+.1f} [{d[1] * 100:+.1f}, {d[2] * 100:+.1f}])" if d else ""))
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        cols = 4
        rows = -(-len(corruptions) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, c in zip(axes.flat, corruptions):
            for m in models:
                ys = [statistics.mean(vals(m, "clean"))] + [statistics.mean(vals(m, f"{c}-{lv}")) for lv in levels]
                ax.plot([0, *levels], [y * 100 for y in ys], marker="o", label=m)
            ax.set_title(c)
            ax.set_xticks([0, *levels])
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel("AP@0.5 %")
        for ax in list(axes.flat)[len(corruptions):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ap-vs-severity.png", dpi=90)
        plt.close(fig)
        lines += ["", "![AP vs severity](ap-vs-severity.png)"]
    pictures = [_link(p, out) for r in [run, *(o for o, _ in others)]
                for p in sorted((r.path / "samples").glob("bev-*.png"))]
    if pictures:
        lines += ["", "## BEV pictures (test frames; ego black, collaborators coloured)", ""]
        lines += [f"![{Path(p).name}]({p})" for p in pictures]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
