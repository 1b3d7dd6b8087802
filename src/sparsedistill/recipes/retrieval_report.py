"""The ``retrieval train`` report: one run's, or several runs' merged (seeds and variants run on different
machines), with the planned-but-missing jobs named in the planned order.

``report_from_run`` checks that the runs differ only in what cannot change a result (``check_mergeable``), reads
every finished evaluation, and ``write_report`` writes the tables and the figure.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from ..report import command_line, markdown_table, plt, save_figure
from ..runs import Run, atomic_write_bytes
from ..runs import check_mergeable as check_configs_mergeable

__all__ = ["report_from_run", "check_mergeable", "write_report"]

def _planned(cfg_texts: list[str]) -> tuple[list[str], list[str]]:
    """(labels, collections) the runs' config.toml files plan: ``base`` (when evaluated), then each seed's variants."""
    labels: list[str] = []
    cols: list[str] = []
    for text in cfg_texts:
        cfg = tomllib.loads(text) if text else {}
        ev = cfg.get("eval", {})
        labels += ["base"] if ev.get("base", True) else []
        labels += [f"{v}-s{s}" for s in cfg.get("seeds", []) for v in cfg.get("variants", [])]
        cols += list(ev.get("collections", []))
    return list(dict.fromkeys(labels)), list(dict.fromkeys(cols))


# What may differ between runs merged into one report: which jobs each ran, where its cache lives, how
# often it checkpointed (none of these changes a result).
_MERGE_FREE = (("variants",), ("seeds",), ("eval", "base"), ("teachers", "cache_dir"))


def check_mergeable(run_dirs: list[Path]) -> None:
    """Runs merge into one report only when their configs agree on everything but variants, seeds,
    ``eval.base``, the cache folder and checkpoint intervals (e.g. ablation variants run as parallel processes)."""
    from .retrieval_train import RetrievalTrainConfig

    check_configs_mergeable(run_dirs, RetrievalTrainConfig, _MERGE_FREE)


class _MergedRuns:
    """Several runs of one config read as one: a job's result or metrics come from the first run that has them."""

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs

    def result(self, job: str) -> dict[str, Any] | None:
        return next((r for run in self.runs if (r := run.result(job)) is not None), None)

    def metrics(self, job: str) -> list[dict[str, Any]]:
        return next((m for run in self.runs if (m := run.metrics(job))), [])


def report_from_run(run_dir: Path, *more: Path) -> Path:
    """Write report.md from the evaluations the runs have finished (cut by a time limit too), in the planned
    order, into the first run's directory. Several runs (same config, other variants or seeds) merge."""
    dirs = [Path(run_dir), *map(Path, more)]
    if more:
        check_mergeable(dirs)
    runs = [Run.open(d) for d in dirs]
    per_run = [[json.loads(f.read_text()) for f in sorted((run.path / "results").glob("eval-*.json"))] for run in runs]
    owner: dict[str, Path] = {}
    for d, rs in zip(dirs, per_run):
        for lab in dict.fromkeys(r["label"] for r in rs):
            if owner.setdefault(lab, d) != d:  # one model's rows must not mix two trainings
                raise ValueError(f"{lab} was evaluated in both {owner[lab]} and {d}: merge runs that hold different "
                                 "variants or seeds (run extra ones with --set eval.base=false)")
    results = [r for rs in per_run for r in rs]
    if not results:
        raise FileNotFoundError(f"{', '.join(map(str, dirs))}: no finished evaluation (results/eval-*.json), nothing to report")
    labels, cols = _planned([(d / "config.toml").read_text() for d in dirs if (d / "config.toml").exists()])
    lab_rank, col_rank = {x: i for i, x in enumerate(labels)}, {x: i for i, x in enumerate(cols)}
    results.sort(key=lambda r: (lab_rank.get(r["label"], len(labels)), col_rank.get(r.get("source"), len(cols))))
    return write_report(runs, results)


def _label_parts(label: str) -> tuple[str, int | None]:
    if label == "base":
        return "base", None
    v, s = label.rsplit("-s", 1)
    return v, int(s)


def _served_learned(by: dict, label: str, cols: list[str]) -> bool:
    """A binary-query model whose IDF serving also has learned query weights (``ours_idf_queries`` then holds them)."""
    return any("ours_idf_queries_plain_idf" in by.get((label, c), {}) for c in cols)


def _served_name(variant: str, learned: bool) -> str:
    return f"{variant}, served with IDF queries{' + learned query weights' if learned else ''}"


def _run_name(run: Run, first: Run) -> str:
    """How a merged run is named in the report: the first by its folder, the others relative to it where they can be."""
    if run is first:
        return run.path.resolve().name
    rel = Path(os.path.relpath(run.path, first.path))
    return str(run.path) if rel.parts[0] == ".." else str(rel)


def write_report(runs: list[Run], results: list[dict[str, Any]]) -> Path:
    """report.md, retrieval_train.png and summary.json in the first run's directory."""
    out, run = runs[0], _MergedRuns(runs)
    envs = [r.environment() for r in runs]
    cols = list(dict.fromkeys(r["collection"] for r in results))
    bm25 = {r["collection"]: r["bm25"] for r in results}
    labels = list(dict.fromkeys(r["label"] for r in results))
    by = {(r["label"], r["collection"]): r for r in results}
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731

    rows = [["BM25 (bm25s)", "", *[f"{pct(bm25[c]['ndcg@10'])} / {pct(bm25[c]['recall@100'])} / -" for c in cols], ""]]
    per_seed: dict[str, list[tuple[int | None, float, float]]] = {}  # variant -> (seed, mean diff, mean nnz), with query weights
    for lab in labels:
        v, s = _label_parts(lab)
        learned = any("ours_plain_idf" in by.get((lab, c), {}) for c in cols)
        binary = any("ours_idf_queries" in by.get((lab, c), {}) for c in cols)  # trained with binary queries
        served_learned = _served_learned(by, lab, cols)
        for key, name in ([("ours_plain_idf", f"{v} (plain IDF queries)")] if learned else []) + [
                ("ours", f"{v} + learned query weights" if learned else v)] + (
                [("ours_idf_queries_plain_idf", _served_name(v, False))] if served_learned else []) + (
                [("ours_idf_queries", _served_name(v, served_learned))] if binary else []):
            cells, diffs = [], []
            for c in cols:
                r = by.get((lab, c))
                if r is None or key not in r:
                    cells.append("-")
                    continue
                diffs.append(r[key]["ndcg@10"] - bm25[c]["ndcg@10"])
                cells.append(f"{pct(r[key]['ndcg@10'])} ({100 * diffs[-1]:+.2f}) / {pct(r[key]['recall@100'])} / {r['nnz_per_doc']:.0f}")
            mean = f"{100 * sum(diffs) / len(diffs):+.2f}" if diffs else "-"
            rows.append([name, "" if s is None else s, *cells, mean])
            if key == "ours" and len(diffs) == len(cols):
                per_seed.setdefault(v, []).append((s, sum(diffs) / len(diffs),
                                                   sum(by[(lab, c)]["nnz_per_doc"] for c in cols) / len(cols)))
    index_rows = []  # the served engine (uint8 impacts) against the float scores above, named as their rows there
    for lab in labels:
        v, seed = _label_parts(lab)
        learned = any("ours_plain_idf" in by.get((lab, c), {}) for c in cols)
        for key, name in (("ours", f"{v} + learned query weights" if learned else v),
                          ("ours_idf_queries", _served_name(v, _served_learned(by, lab, cols)))):
            if not any(f"{key}_index" in by.get((lab, c), {}) for c in cols):
                continue
            index_rows.append([name, "" if seed is None else seed, *[f"{pct(by[(lab, c)][key + '_index']['ndcg@10'])} "
                                       f"({100 * (by[(lab, c)][key + '_index']['ndcg@10'] - by[(lab, c)][key]['ndcg@10']):+.2f})"
                                       if f"{key}_index" in by.get((lab, c), {}) else "-" for c in cols]])
    seed_rows = [[v, len(xs), f"{100 * sum(d for _, d, _ in xs) / len(xs):+.2f}",
                  ", ".join(f"s{s}: {100 * d:+.2f}" for s, d, _ in xs), f"{sum(n for *_, n in xs) / len(xs):.0f}"]
                 for v, xs in per_seed.items() if v != "base"]
    query_rows = []
    for lab in labels:
        qr = run.result(f"query-{lab}")
        if qr:
            query_rows.append([lab, ", ".join(f"{x['collection']} ({x['source']}, target: {x.get('target', 'labels')}) {x['fit']} / {x['dev']}"
                                              for x in qr["sets"]),
                               qr["chosen_step"], f"{pct(qr['dev_ndcg@10_plain_idf'])} -> {pct(qr['dev_ndcg@10_chosen'])}",
                               f"{qr['entries_moved']} / {qr['vocab']}", f"{qr['abs_log_scale_max']:.2f}"])
    train_rows = []
    for lab in labels:
        if lab == "base":
            continue
        t = run.result(f"train-{lab}") or {}
        for stage in ("pretrain", "finetune"):
            st = t.get(stage)
            if st:
                spp = st.get("seconds_per_step")
                train_rows.append([lab, stage, st["queries"], st["steps"], f"{spp:.2f}" if spp else "(resumed)",
                                   f"{st['final_rank']:.4f}" if st.get("final_rank") is not None else "-",
                                   f"{st['final_flops']:.3f}" if st.get("final_flops") is not None else "-",
                                   f"{st['final_nnz']:.0f}" if st.get("final_nnz") is not None else "-"])
    data = json.loads((out.path / "data.json").read_text()) if (out.path / "data.json").exists() else {}
    cfgs = [(r.path / "config.toml").read_text() if (r.path / "config.toml").exists() else "" for r in runs]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    color = {lab: f"C{i + 1}" for i, lab in enumerate(labels)}
    ax = axes[0]
    series = [("BM25", "C0", [100 * bm25[c]["ndcg@10"] for c in cols])]
    series += [(lab, color[lab], [100 * by[(lab, c)]["ours"]["ndcg@10"] if (lab, c) in by else 0 for c in cols]) for lab in labels]
    w = 0.8 / len(series)
    for i, (name, col, vals) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * w for j in range(len(cols))], vals, w, label=name, color=col)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_ylabel("NDCG@10 (test qrels)")
    ax.legend(fontsize=6)
    ax = axes[1]
    for lab in labels:
        pts = [(by[(lab, c)]["nnz_per_doc"], 100 * by[(lab, c)]["ours"]["ndcg@10"]) for c in cols if (lab, c) in by]
        ax.scatter(*zip(*pts), label=lab, s=18, color=color[lab])
    ax.set_xlabel("nonzeros / document")
    ax.set_ylabel("NDCG@10 (a point per collection)")
    ax.legend(fontsize=6)
    ax = axes[2]
    for lab in labels:
        pre = sorted(run.metrics(f"pretrain-{lab}"), key=lambda r: r["step"])
        fine = sorted(run.metrics(f"finetune-{lab}"), key=lambda r: r["step"])
        off = (run.result(f"train-{lab}") or {}).get("pretrain", {}).get("steps", 0)
        m = [(r["step"], r["nnz"]) for r in pre] + [(off + r["step"], r["nnz"]) for r in fine]
        if m:
            ax.plot(*zip(*m), label=lab, lw=1, color=color[lab])
    ax.set_xlabel("training step (pre-training, then fine-tuning)")
    ax.set_ylabel("nonzeros / document (training batch)")
    ax.legend(fontsize=6)
    png = save_figure(fig, out.path / "retrieval_train.png")

    planned_labels, planned_cols = _planned(cfgs)
    done = {(r["label"], r.get("source")) for r in results}
    missing = [lab if all((lab, c) not in done for c in planned_cols) else f"{lab} on {c}"
               for lab in planned_labels for c in planned_cols if (lab, c) not in done]
    missing = list(dict.fromkeys(missing))  # a label evaluated nowhere is named once
    md = ["# Inference-free sparse retrieval: ensemble-distilled SPLADE-tiny vs BM25", "",
          *(x for env, r in zip(envs, runs) for x in ((f"Run `{_run_name(r, runs[0])}`: " if len(runs) > 1 else "") + command_line(env), "")),
          *([f"**Not finished** (not trained or not evaluated when this report was written): {', '.join(missing)}.", ""]
            if missing else []),
          "Queries are IDF-weighted tokens (no query model); documents are the trained SPLADE-tiny's vectors. Each cell: "
          "NDCG@10 (difference to BM25) / Recall@100 / nonzeros per document, on the collections' **test** qrels. "
          "`base` is SPLADE-tiny as shipped at the same max length. Collections named `<name>-<Q>q-<D>d` are subsamples "
          "(Q test queries, their judged documents plus random others, D documents in all; BM25 runs on the same subsample).", "",
          markdown_table(["model", "seed", *[f"{c}: NDCG@10 / R@100 / nnz" for c in cols], "mean NDCG@10 diff"], rows), "",
          *(["Over seeds (each variant's final model; only seeds evaluated on every collection count):", "",
             markdown_table(["variant", "seeds", "mean NDCG@10 diff to BM25", "per seed", "mean nnz / doc"], seed_rows), ""]
            if any(len(x) > 1 for x in per_seed.values()) else []),
          *(["What the served index (`SparseIndex`: uint8 impacts, exact top-k) ranks: NDCG@10 (difference to the float "
             "scores above):", "", markdown_table(["model", "seed", *cols], index_rows), ""] if index_rows else []),
          f"![results]({png})", "", "## Training", "",
          markdown_table(["job", "stage", "queries", "steps", "s/step", "final ranking loss", "final FLOPS term", "train nnz/doc"], train_rows)
          if train_rows else "(no training jobs)", "",
          *(["## Learned query-term weights", "",
             "Query weight = IDF x exp(g) per vocabulary entry, g learned with the documents fixed (listwise softmax over the "
             "whole corpus, L2 on g) toward each query's target (its judged documents, a pseudo-query's source document, or the "
             "teachers' distribution over its top documents); held-out training queries (never test ones), scored against "
             "the same targets, choose the step, step 0 being plain IDF.", "",
             markdown_table(["model", "queries fit / held out", "chosen step", "held-out NDCG@10: IDF -> learned", "entries moved",
                             "max |g|"], query_rows), ""] if query_rows else []),
          "## Training data", "",
          "Pseudo-queries (sentence / title / random crop of a document, which is their positive) from the training corpora's "
          "documents; fine-tuning queries from the train qrels only. Any query equal to a test query was dropped, and the run "
          "refuses a training set that holds a test-split query id or text.", "",
          "```json", json.dumps(data, indent=1), "```", "", "## Config", "",
          *([f"Runs merged: {', '.join(f'`{_run_name(r, runs[0])}`' for r in runs)}; their configs differ only in `variants`, `seeds`, "
             "`eval.base`, `teachers.cache_dir` or `checkpoint_every` (checked). The first run's:", ""] if len(runs) > 1 else []),
          "```toml", cfgs[0].strip(), "```", ""]
    summary = {"environment": envs[0] if len(envs) == 1 else envs, "data": data, "results": results,
               "train": {lab: run.result(f"train-{lab}") for lab in labels if lab != "base"},
               "query_weights": {lab: run.result(f"query-{lab}") for lab in labels if run.result(f"query-{lab}")}}
    atomic_write_bytes(out.path / "summary.json", json.dumps(summary, indent=1).encode())
    report = out.path / "report.md"
    atomic_write_bytes(report, "\n".join(md).encode())
    return report


def _seed_means(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One curve point per FLOPS weight, NDCG@10 and nonzeros averaged over its seeds, in order of nonzeros."""
    by_weight: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_weight.setdefault(p["flops_weight"], []).append(p)
    curve = [{"flops_weight": w, "seeds": len(ps), "nnz_per_doc": sum(p["nnz_per_doc"] for p in ps) / len(ps),
              "ndcg@10": sum(p["ndcg@10"] for p in ps) / len(ps)} for w, ps in by_weight.items()]
    return sorted(curve, key=lambda p: p["nnz_per_doc"])


def write_plane(run_dirs: list[Path], out_dir: Path) -> Path:
    """The quality-sparsity plane of a FLOPS-weight sweep: for every trained model of the runs (each run may use its
    own ``loss.flops_weight`` / ``loss.plain_flops_weight``), mean NDCG@10 over the evaluated collections against the
    mean document nonzeros, one curve per variant (a point per FLOPS weight, its seeds averaged; a ``baseline`` model,
    trained with binary queries, is drawn twice: as trained, and its documents served with IDF queries), the base
    model and BM25 as references. Writes ``plane.md``,
    ``plane.png`` and ``plane.json`` into ``out_dir``; returns plane.md. Variants are compared on equal collections:
    a model missing one of the collections the others have is listed, not plotted."""
    from .retrieval_train import RetrievalTrainConfig, _variant
    from ..config import load_config

    points: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for d in map(Path, run_dirs):
        if not (d / "config.toml").exists():
            raise FileNotFoundError(f"{d} is not a retrieval train run directory (no config.toml)")
        cfg = load_config(RetrievalTrainConfig, str(d / "config.toml"), [])
        by_label: dict[str, list[dict[str, Any]]] = {}
        for f in sorted((d / "results").glob("eval-*.json")):
            r = json.loads(f.read_text())
            by_label.setdefault(r["label"], []).append(r)
        for label, rows in by_label.items():
            # the documents' plane: IDF-only query figures where a model also learned query weights
            point = {"run": str(d), "label": label, "collections": sorted(r["collection"] for r in rows),
                     "ndcg@10": sum(r.get("ours_plain_idf", r["ours"])["ndcg@10"] for r in rows) / len(rows),
                     "bm25_ndcg@10": sum(r["bm25"]["ndcg@10"] for r in rows) / len(rows),
                     "nnz_per_doc": sum(r["nnz_per_doc"] for r in rows) / len(rows)}
            if label == "base":
                base = base or point
                continue
            variant, seed = _label_parts(label)
            point.update(variant=variant, seed=seed, flops_weight=_variant(cfg, variant)["flops_weight"])
            points.append(point)
            if all("ours_idf_queries" in r for r in rows):  # binary-query training: its documents, IDF queries served
                points.append(point | {"variant": f"{variant}, IDF queries", "ndcg@10": sum(
                    r.get("ours_idf_queries_plain_idf", r["ours_idf_queries"])["ndcg@10"] for r in rows) / len(rows)})
    if not points:
        raise FileNotFoundError(f"{', '.join(map(str, run_dirs))}: no evaluated trained model (results/eval-*.json)")
    full = max((p["collections"] for p in points), key=len)
    plotted = [p for p in points if p["collections"] == full]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    variants = dict.fromkeys(p["variant"] for p in plotted)
    curves = {v: _seed_means([p for p in plotted if p["variant"] == v]) for v in variants}
    for variant, curve in curves.items():
        ax.plot([p["nnz_per_doc"] for p in curve], [100 * p["ndcg@10"] for p in curve], "o-", label=variant)
        for p in curve:
            ax.annotate(f"{p['flops_weight']:g}" + (f" ({p['seeds']} seeds)" if p["seeds"] > 1 else ""),
                        (p["nnz_per_doc"], 100 * p["ndcg@10"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    if base and base["collections"] == full:
        ax.plot([base["nnz_per_doc"]], [100 * base["ndcg@10"]], "k*", ms=10, label="SPLADE-tiny as shipped")
    ax.axhline(100 * plotted[0]["bm25_ndcg@10"], color="grey", ls="--", lw=1, label="BM25")
    ax.set_xlabel("document nonzeros (mean over collections)")
    ax.set_ylabel("NDCG@10 % (mean over collections)")
    ax.set_title(f"quality-sparsity plane ({', '.join(full)})", fontsize=9)
    ax.legend(fontsize=8)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = save_figure(fig, out_dir / "plane.png")
    rows = [[p["variant"], p["seed"], f"{p['flops_weight']:g}", f"{p['nnz_per_doc']:.1f}", f"{100 * p['ndcg@10']:.2f}",
             f"{100 * (p['ndcg@10'] - p['bm25_ndcg@10']):+.2f}", p["run"]]
            for p in sorted(points, key=lambda p: (p["variant"], p["nnz_per_doc"]))]
    left = [p["label"] + " (" + ", ".join(p["collections"]) + ")" for p in points if p not in plotted]
    text = ["# Quality-sparsity plane", "",
            f"Mean over {', '.join(full)}; the number beside each point is its FLOPS weight. "
            + (f"SPLADE-tiny as shipped: {base['nnz_per_doc']:.1f} nonzeros, NDCG@10 {100 * base['ndcg@10']:.2f} %. "
               if base else "") + f"BM25: {100 * plotted[0]['bm25_ndcg@10']:.2f} %.", "",
            markdown_table(["variant", "seed", "FLOPS weight", "nonzeros / doc", "NDCG@10 %", "vs BM25", "run"], rows), "",
            f"![plane]({png})", ""]
    if left:
        text += ["Not plotted (evaluated on fewer collections): " + "; ".join(left), ""]
    plane = {"base": base, "points": points, "curves": curves}
    atomic_write_bytes(out_dir / "plane.json", json.dumps(plane, indent=1).encode())
    report = out_dir / "plane.md"
    atomic_write_bytes(report, "\n".join(text).encode())
    return report
