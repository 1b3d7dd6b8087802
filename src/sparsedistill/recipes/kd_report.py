"""Report of the distillation-core experiment: markdown tables and PNG plots from a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import load_fashion_mnist
from ..distill import brier_bias_variance, fit_inverse_n, log_loss_bias_variance
from ..report import fmt_mean_std, markdown_table, mean_std, plt, save_figure, environment_line
from ..runs import Run

__all__ = ["write_report", "format_summary"]

LABELS = {"full": "KD (full logits)", "ce": "CE only", "topk": "KD top-{k}", "sampled": "KD sampled ({k}/step)", "hard": "hard labels (text-only)"}


def _label(spec: dict[str, Any]) -> str:
    return LABELS[spec["loss"]].format(k=spec["k"])


def _accs(run: Run, jobs: list[str]) -> list[float]:
    """Test accuracy per seed, in seed order (the report is written once every job has finished)."""
    return [run.result(j)["test_acc"] for j in jobs]


def _bias_variance(run: Run, jobs: list[str], labels: torch.Tensor) -> dict[str, float] | None:
    files = [run.artifact("predictions") / f"{j}.npy" for j in jobs]
    if len(files) < 2 or not all(f.exists() for f in files):
        return None
    probs = torch.from_numpy(np.stack([np.load(f).astype(np.float64) for f in files]))
    b, l = brier_bias_variance(probs, labels), log_loss_bias_variance(probs, labels)
    return {"brier_bias": b.bias, "brier_variance": b.variance, "logloss_bias": l.bias, "logloss_variance": l.variance}


def _accuracy_bars(path: Path, labels: list[str], accs: list[list[float]], teacher_mean: float, colors: list[str]) -> str:
    """Bar chart of mean test accuracy (± std over seeds) against the dense teacher; returns the PNG name."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    means = [mean_std(a)[0] * 100 for a in accs]
    ax.bar(range(len(labels)), means, yerr=[mean_std(a)[1] * 100 for a in accs], color=colors)
    ax.axhline(teacher_mean * 100, color="k", ls="--", lw=1, label="dense teacher")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(min(means) - 2, max(max(means), teacher_mean * 100) + 1)
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    return save_figure(fig, path)


def write_report(run: Run, cfg: Any, index: dict[str, Any]) -> Path:
    seeds = cfg.seeds
    teacher_accs = [index["teachers"][s]["test_acc"] for s in seeds]
    t_mean, _ = mean_std(teacher_accs)
    test_y = load_fashion_mnist(cfg.data.train_subset, cfg.data.test_subset).test_y
    summary: dict[str, Any] = {"teacher_acc": teacher_accs, "parts": {}}
    env = run.environment()
    secs = run.elapsed_seconds()
    elapsed = f"{secs / 60:.1f} min to the last finished job" if secs is not None else "elapsed time unknown"
    md = [
        "# Distillation-core experiment (Fashion-MNIST)",
        "",
        f"Command: `{env.get('command', '')}` (started {env.get('started', '?')}; {elapsed})  ",
        f"Seeds: {seeds}; training rows: {cfg.data.train_subset or 'all 60,000'}; "
        f"test rows: {index['teachers'][seeds[0]]['test_rows']}; data: `{index['data_source']}`.  ",
        f"Environment at the run's start: {environment_line(env)}.",
        "",
        f"Model: MLP {cfg.model.hidden} (dropout {cfg.model.dropout}); the classifier head stays dense. "
        f"Teacher: {cfg.teacher.steps} steps of cross-entropy. Students start from the teacher's weights and get "
        f"{cfg.student.steps} fine-tuning steps (multi-stage budgets: see (b)); KD students use "
        f"{cfg.kd.alpha:g} x KD + {1 - cfg.kd.alpha:g} x CE at T = {cfg.kd.temperature:g} ({cfg.kd.operator} operator). "
        "Accuracies are top-1 on the test set in %, mean ± sample std over seeds.",
        "",
        f"**Dense teacher: {fmt_mean_std(teacher_accs)} %**",
        "",
    ]
    parts = index["parts"]

    def rows_for(part: str) -> list[tuple[dict[str, Any], list[str], list[float]]]:
        out = []
        for jobs in parts.get(part, []):
            first = run.result(jobs[0])
            out.append((first["spec"], jobs, _accs(run, jobs)))
        return out

    # (a) KD vs CE ---------------------------------------------------------------------------
    if "kd_vs_ce" in parts:
        rows = rows_for("kd_vs_ce")
        table, bv_rows = [], []
        for spec, jobs, accs in rows:
            sp = "2:4" if spec["sparsity"] == "2:4" else f"{spec['target']:.0%} unstructured"
            table.append([sp, _label(spec), fmt_mean_std(accs), f"{(mean_std(accs)[0] - t_mean) * 100:+.2f}"])
            bv = _bias_variance(run, jobs, test_y)
            if bv:
                bv_rows.append([sp, _label(spec)] + [f"{bv[k]:.4f}" for k in ("brier_bias", "brier_variance", "logloss_bias", "logloss_variance")])
            summary["parts"].setdefault("kd_vs_ce", {})[f"{sp} / {_label(spec)}"] = mean_std(accs)
        png = _accuracy_bars(run.artifact("kd_vs_ce.png"), [f"{r[0]}\n{r[1]}" for r in table], [a for _, _, a in rows],
                             t_mean, ["C0" if spec["loss"] != "ce" else "C1" for spec, _, _ in rows])
        md += ["## (a) KD vs cross-entropy at equal sparsity", "",
               markdown_table(["sparsity", "student", "accuracy", "Δ vs teacher (pts)"], table), "", f"![KD vs CE]({png})", ""]
        if bv_rows:
            md += ["Bias-variance decomposition of the students' test predictions over seeds "
                   "(squared error on probabilities, and Heskes' log-loss decomposition):", "",
                   markdown_table(["sparsity", "student", "Brier bias", "Brier variance", "log-loss bias", "log-loss variance"], bv_rows), ""]

    # (b) multi-stage ------------------------------------------------------------------------
    if "multistage" in parts:
        rows = rows_for("multistage")
        table, series = [], {}
        budgets = {"split": "shared", "each": "per stage"}
        curves = sorted({(r[0]["teacher_source"], r[0].get("budget", "split")) for r in rows if r[0]["stages"] > 1})
        for spec, jobs, accs in rows:
            one_shot = spec["stages"] == 1
            gap = [t - a for t, a in zip(teacher_accs, accs)]
            table.append([spec["stages"], "—" if one_shot else spec["teacher_source"],
                          "—" if one_shot else budgets[spec.get("budget", "split")], fmt_mean_std(accs), fmt_mean_std(gap)])
            key = "one-shot" if one_shot else f"n={spec['stages']} teacher={spec['teacher_source']} steps {budgets[spec.get('budget', 'split')]}"
            summary["parts"].setdefault("multistage", {})[key] = mean_std(accs)
            for curve in curves if one_shot else [(spec["teacher_source"], spec.get("budget", "split"))]:
                series.setdefault(f"teacher={curve[0]}, steps {budgets[curve[1]]}", []).append((spec["stages"], mean_std(gap)[0], mean_std(gap)[1]))
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        fits = {}
        for i, (source, pts) in enumerate(sorted(series.items())):
            pts.sort()
            ns, gaps, errs = (np.array(v) for v in zip(*pts))
            ax.errorbar(ns * (1 + 0.03 * i), gaps * 100, yerr=errs * 100, fmt="o", color=f"C{i}", label=source)
            if len(ns) >= 2:
                fit = fit_inverse_n(ns, gaps)
                fits[source] = fit
                grid = np.linspace(ns.min(), ns.max(), 100)
                ax.plot(grid, fit.predict(grid) * 100, color=f"C{i}", lw=1,
                        label=f"fit {fit.a * 100:.2f} + {fit.b * 100:.2f}/n (R² {fit.r2:.2f})")
        ax.set_xscale("log", base=2)
        ticks = sorted({n for pts in series.values() for n, _, _ in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("stages n")
        ax.set_ylabel("teacher − student accuracy (pts)")
        ax.legend(fontsize=7)
        png = save_figure(fig, run.artifact("multistage.png"))
        target = cfg.sparsity.multistage_target
        md += [f"## (b) One-shot vs n-stage pruning to {target:.0%} unstructured sparsity", "",
               f"Each stage prunes a further slice of the final mask (nested masks, {cfg.sparsity.path} path in the kept fraction) "
               f"and distills from the stage i−1 student ('previous') or the dense teacher ('original'). Steps 'shared': the "
               f"n stages split the one-shot budget of {cfg.student.steps} steps; 'per stage': each stage gets all of it (n× compute).", "",
               markdown_table(["stages n", "teacher of each stage", "steps", "accuracy", "gap to teacher (pts)"], table), ""]
        for source, fit in fits.items():
            gamma = "n/a" if np.isnan(fit.gamma) else f"{fit.gamma:.2f}"
            md.append(f"- fit ({source}): gap(n) = {fit.a * 100:.3f} + {fit.b * 100:.3f}/n pts, R² = {fit.r2:.3f}; "
                      f"power-law exponent γ = {gamma} (1/n predicts b > 0 and γ ≈ 1).")
            summary["parts"].setdefault("multistage_fit", {})[source] = vars(fit)
        md += ["", f"![gap vs stages]({png})", ""]

    # (c) teacher access ---------------------------------------------------------------------
    if "teacher_access" in parts:
        rows = rows_for("teacher_access")
        table = []
        for spec, jobs, accs in rows:
            kept = [r.get("teacher_mass_kept") for j in jobs if (r := run.result(j))]
            kept_s = f"{np.mean(kept) * 100:.1f}" if kept and kept[0] is not None else ("100" if spec["loss"] == "full" else "—")
            table.append([_label(spec), kept_s, fmt_mean_std(accs), f"{(mean_std(accs)[0] - t_mean) * 100:+.2f}"])
            summary["parts"].setdefault("teacher_access", {})[_label(spec)] = mean_std(accs)
        png = _accuracy_bars(run.artifact("teacher_access.png"), [r[0].replace(" (", "\n(") for r in table],
                             [a for _, _, a in rows], t_mean, ["C2"] * len(rows))
        md += [f"## (c) Teacher access at {cfg.sparsity.unstructured:.0%} unstructured sparsity", "",
               "Top-k and hard-label targets come from a memory-mapped teacher cache built once per seed; "
               "the sampled teacher draws fresh classes from the softened teacher every step (unbiased KL estimate).", "",
               markdown_table(["teacher access", "teacher mass kept (%)", "accuracy", "Δ vs teacher (pts)"], table), "",
               f"![teacher access]({png})", ""]

    # (d) operators --------------------------------------------------------------------------
    if "operators" in parts:
        rows = rows_for("operators")
        temps = index["equal_entropy_temperatures"]
        table, series = [], {}
        for t_ref, fams in temps.items():
            for fam, T in fams.items():
                match = [(s, j, a) for s, j, a in rows if s["operator"] == fam and abs(s["temperature"] - round(T, 4)) < 1e-9]
                if not match:
                    continue
                _, _, accs = match[0]
                table.append([f"power T={float(t_ref):g}", fam, f"{T:.3f}", fmt_mean_std(accs)])
                series.setdefault(fam, []).append((float(t_ref), mean_std(accs)[0], mean_std(accs)[1]))
                summary["parts"].setdefault("operators", {})[f"{fam} @ entropy of power T={float(t_ref):g}"] = mean_std(accs)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for i, (fam, pts) in enumerate(series.items()):
            pts.sort()
            x, m, s = (np.array(v) for v in zip(*pts))
            ax.errorbar(x + 0.05 * (i - 1), m * 100, yerr=s * 100, marker="o", capsize=3, label=fam)
        ax.set_xlabel("entropy level (as power operator at T)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend()
        png = save_figure(fig, run.artifact("operators.png"))
        md += [f"## (d) Softening operators at equal teacher entropy ({cfg.sparsity.unstructured:.0%} unstructured)", "",
               "For each entropy level, every family's temperature is solved by bisection so the teacher's mean "
               "softened entropy equals the power operator's at the reference T.", "",
               markdown_table(["entropy level", "operator", "temperature", "accuracy"], table), "", f"![operators]({png})", ""]

    # training curves ------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for job in [f"teacher-s{seeds[0]}"] + [j[0] + ".stage0" for j in parts.get("kd_vs_ce", [])]:
        rows_m = run.metrics(job)
        if rows_m:
            ax.plot([r["step"] for r in rows_m], [r["loss"] for r in rows_m], label=job.replace(".stage0", ""), lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    md += ["## Training curves (seed %d)" % seeds[0], "", f"![training curves]({save_figure(fig, run.artifact('curves.png'))})", ""]

    (run.artifact("summary.json")).write_text(json.dumps(summary, indent=1, default=float))
    path = run.artifact("report.md")
    path.write_text("\n".join(md))
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """Plain-text digest of ``summary.json`` for the terminal (accuracy in %, mean ± std over seeds)."""
    m, s = mean_std(summary["teacher_acc"])
    lines = [f"{'dense teacher':<58} {m * 100:6.2f} ± {s * 100:.2f}"]
    for part, entries in summary["parts"].items():
        if part == "multistage_fit":
            for source, fit in entries.items():
                lines.append(f"  1/n fit ({source}): gap = {fit['a'] * 100:.2f} + {fit['b'] * 100:.2f}/n pts, R² {fit['r2']:.2f}")
            continue
        lines.append(part)
        for name, (mean, std) in entries.items():
            lines.append(f"  {name:<56} {mean * 100:6.2f} ± {std * 100:.2f}")
    return "\n".join(lines)
