"""Report of ``vit compress``: students vs teacher (accuracy, bytes, FLOPs, GPU speed), KD ablation, plots.

Reads the results of one or more run directories (several runs of different seeds merge into
one report), so it can be rebuilt at any time with ``sparsedistill vit report RUN [RUN ...]``.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..report import fmt_mean_std, markdown_table, mean_std, plt, save_figure, environment_line
from ..runs import Run, atomic_write_bytes

__all__ = ["write_report", "format_summary", "collect"]

# (job prefix, label, format, largest allowed drop vs the teacher in points or None)
STUDENTS = [
    ("sparse-full", "2:4 FP16, mixed KD", "fp16", 0.3),
    ("qat-int8", "2:4 INT8, mixed KD + QAT", "int8", 0.5),
    ("qat-fp8", "2:4 FP8 (E4M3), mixed KD + QAT", "fp8", None),
    ("qat-int8-unsup", "2:4 INT8, unsupervised KD + QAT", "int8", 1.0),
]
ABLATION = [
    ("sparse-ce", "CE only"),
    ("sparse-logits", "CE + logits"),
    ("sparse-full", "CE + logits + features + attention"),
    ("sparse-unsup", "logits + features + attention (no labels)"),
]


def collect(runs: list[Run]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{job prefix: {seed: result}}`` over every finished job of ``runs``, with GPU timings where measured."""
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        speed_file = run.path / "speed.json"
        speed = json.loads(speed_file.read_text()) if speed_file.exists() else {}
        for f in sorted((run.path / "results").glob("*.json")):
            m = re.fullmatch(r"(.+)-s(\d+)", f.stem)
            if m:
                result = json.loads(f.read_text())
                if f.stem in speed:
                    result["deployed"]["speed"] = speed[f.stem]
                out[m.group(1)][int(m.group(2))] = result
    return out


def _pp_range(deltas: list[float]) -> str:
    """Accuracy differences (fractions) as a signed range of percentage points."""
    lo, hi = 100 * min(deltas), 100 * max(deltas)
    return f"{lo:+.2f}" if abs(hi - lo) < 5e-3 else f"{lo:+.2f} to {hi:+.2f}"


def _acc(results: dict[int, dict[str, Any]], seeds: list[int]) -> list[float]:
    """Deployed accuracy where there is a deployed model (students), else the model's own (teacher, pruned)."""
    return [results[s].get("deployed", {}).get("test_acc", results[s]["test_acc"]) for s in seeds if s in results]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def write_report(runs: list[Run], index: dict[str, Any] | None = None, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or runs[0].path
    out_dir.mkdir(parents=True, exist_ok=True)
    res = collect(runs)
    if "teacher" not in res:
        raise ValueError(f"no finished teacher in {[str(r.path) for r in runs]}: nothing to report yet")
    seeds = sorted(res["teacher"])
    cfg = tomllib.loads((runs[0].path / "config.toml").read_text())
    teacher = [res["teacher"][s] for s in seeds]
    t_acc = [t["test_acc"] for t in teacher]
    t_mean = mean_std(t_acc)[0]
    fp32, fp16 = teacher[0]["deployed"]["bytes_fp32"], teacher[0]["deployed"]["bytes_fp16"]
    t_flops = teacher[0]["flops"]["total"]
    summary: dict[str, Any] = {"seeds": seeds, "rows": []}

    def teacher_mean(prefix: str) -> float:
        """The teacher's accuracy over the seeds this row has: students are compared with their own teachers."""
        return mean_std([res["teacher"][s]["test_acc"] for s in seeds if s in res.get(prefix, {})])[0]

    def row(label: str, fmt: str, accs: list[float], bytes_: int, flops: int, target: float | None, speed: list[float] | None,
            prefix: str = "teacher") -> list[str]:
        drop = (teacher_mean(prefix) - mean_std(accs)[0]) * 100
        verdict = "" if target is None else (f" (target <= {target}: **{'met' if drop <= target else 'missed'}**)")
        spd = f"{np.median(speed):.2f}x" if speed else "n/a"
        summary["rows"].append({"model": label, "format": fmt, "acc": accs, "drop_points": drop, "target": target,
                                "bytes": bytes_, "x_smaller_fp32": fp32 / bytes_, "flops": flops, "gpu_speedup": speed})
        return [label, fmt, fmt_mean_std(accs), f"{-drop:+.2f}{verdict}", _mb(bytes_), f"{fp32 / bytes_:.2f}x",
                f"{fp16 / bytes_:.2f}x", f"{flops / 1e6:.1f}", spd]

    def seeds_of(prefix: str) -> str:
        return ", ".join(str(s) for s in seeds if s in res[prefix])

    rows = [["dense teacher", seeds_of("teacher"), *row("dense teacher", "fp32", t_acc, fp32, t_flops, None, None)[1:]]]
    rows[0][4], rows[0][5], rows[0][9] = "", f"{_mb(fp32)} (fp16: {_mb(fp16)})", "baseline" if _speeds(res) else "n/a"
    for prefix, label, fmt, target in STUDENTS:
        if prefix in res:
            r = [res[prefix][s] for s in seeds if s in res[prefix]]
            speed = [x["deployed"]["speed"]["speedup"] for x in r if "speed" in x["deployed"]]
            cells = row(label, fmt, _acc(res[prefix], seeds), r[0]["deployed"]["bytes"]["total"], r[0]["flops"]["total"], target,
                        speed or None, prefix)
            rows.append([cells[0], seeds_of(prefix), *cells[1:]])

    runs_on = {x["deployed"]["runs_on"] for p, *_ in STUDENTS if p in res for x in res[p].values()}
    agree = [x["deployed"]["agreement_with_training_graph"] for p, *_ in STUDENTS if p in res for x in res[p].values()]
    fused = [(x["deployed"]["test_acc"], x["deployed"]["test_acc_fused_mlp"]) for p, *_ in STUDENTS if p in res
             for x in res[p].values() if "test_acc_fused_mlp" in x["deployed"]]
    elapsed = [r.elapsed_seconds() for r in runs]
    md = [
        "# GPUSQ-ViT on Fashion-MNIST: 2:4 sparse, quantised ViT students distilled from a dense teacher",
        "",
        f"Seeds {seeds}; model `{cfg['model']['name']}`; test rows: {teacher[0]['test_rows']}"
        + (f"; data `{index['data_source']}`" if index else "") + ". Runs:",
        "",
    ]
    for run, secs in zip(runs, elapsed):
        e = run.environment()
        md.append(f"- `{run.path}`: `{e.get('command', '')}` (started {e.get('started', '?')}"
                  + (f", {secs / 60:.1f} min to its last finished job" if secs else "") + "; "
                  + environment_line(e) + ")")
    md += [
        "",
        f"Teacher: {cfg['teacher']['steps']} steps (batch {cfg['teacher']['batch_size']}, label smoothing "
        f"{cfg['teacher']['label_smoothing']}). Students: every qkv/proj/fc1/fc2 Linear 2:4-pruned (after channel "
        f"permutations: {cfg['prune']['permute']}), {cfg['student']['steps']} steps of KD fine-tuning, then "
        f"{cfg['qat']['train']['steps']} steps of QAT with the masks frozen (KD from the {cfg['qat']['teacher']} teacher). "
        f"KD weights: CE {cfg['kd']['ce']}, logits {cfg['kd']['logits']} (T = {cfg['kd']['temperature']}), "
        f"features {cfg['kd']['features']}, attention {cfg['kd']['attention']}.",
        "",
        "Student accuracy is the **deployed** model's: exported to safetensors (2:4 values + 2-bit indices), "
        f"loaded back from the file alone and run on: {', '.join(sorted(runs_on)) or 'n/a'}. "
        + (f"Its predictions agree with the training graph's on {100 * min(agree):.2f}-{100 * max(agree):.2f} % of test images." if agree else "")
        + (" With each MLP's fc1 -> GELU -> int8 fused (cuSPARSELt's epilogue; `fuse_sparse24_mlps`) the int8 students "
           f"score {_pp_range([f - u for u, f in fused])} points against their unfused accuracy." if fused else ""),
        "",
        "## Students vs teacher",
        "",
        "Accuracy: top-1 %, mean ± std over seeds; each student is compared with the teachers of its own seeds. "
        "Bytes: what is stored (2:4 values + index metadata + the "
        "dense rest in fp16). FLOPs per image (2:4 Linears counted at half). GPU speed: the exported model vs "
        "a dense fp16 model of the same shapes, both replayed from CUDA graphs, timed after training "
        + (f"(batch {_speed_batch(res)}, {_speed_device(res)})." if _speed_batch(res)
           else "(not measured for these runs: `sparsedistill vit report RUN... --speed 256` on a GPU does it)."),
        "",
        markdown_table(["model", "seeds", "format", "test acc", "vs teacher (points)", "bytes", "x smaller vs FP32",
                        "x smaller vs FP16", "MFLOPs/image", "GPU speed vs dense fp16"], rows),
        "",
    ]
    md += ["Targets (issue #3): " + "; ".join(_targets(res, seeds, t_mean)) + ".", ""]
    if any(p in res for p, _ in ABLATION):
        md += ["## What each KD term adds (2:4 FP16 students)", ""]
        abl_rows = []
        for prefix, label in ABLATION:
            if prefix in res:
                a = _acc(res[prefix], seeds)
                abl_rows.append([label, seeds_of(prefix), fmt_mean_std(a), f"{(mean_std(a)[0] - teacher_mean(prefix)) * 100:+.2f}"])
        if "prune" in res:
            a = [res["prune"][s]["test_acc"] for s in seeds if s in res["prune"]]
            abl_rows.insert(0, ["one-shot 2:4 pruning, no fine-tuning", seeds_of("prune"), fmt_mean_std(a),
                                f"{(mean_std(a)[0] - teacher_mean('prune')) * 100:+.2f}"])
        md += [markdown_table(["training of the 2:4 student", "seeds", "test acc", "vs teacher"], abl_rows), ""]
    bars = [(label, _acc(res[p], seeds)) for p, label, *_ in STUDENTS if p in res]
    bars += [(label, _acc(res[p], seeds)) for p, label in ABLATION if p in res and p != "sparse-full"]
    if bars:
        md += [f"![accuracy]({_accuracy_plot(out_dir / 'accuracy.png', bars, t_mean)})", ""]
    if "prune" in res:
        perm = defaultdict(lambda: [[], []])
        for r in res["prune"].values():
            for kind, vals in r["permutation"].items():
                perm[kind][0] += vals[0::2]
                perm[kind][1] += vals[1::2]
        if perm:
            md += ["## Channel permutations before 2:4 pruning", "",
                   "Share of the weight magnitude that 2:4 pruning keeps, mean over blocks and seeds. qkv and fc1 read the "
                   "residual stream shared by all blocks, so their channels are not permuted.", "",
                   markdown_table(["layer", "kept without permutation", "kept with permutation"],
                                  [[k, f"{100 * np.mean(b):.2f} %", f"{100 * np.mean(a):.2f} %"] for k, (b, a) in perm.items()]), ""]
    md += [f"![bytes]({_bytes_plot(out_dir / 'bytes.png', summary['rows'], fp16)})", ""]
    curves = _loss_plot(out_dir / "training.png", runs, seeds[0])
    if curves:
        md += [f"![training]({curves})", ""]
    report = out_dir / "report.md"
    atomic_write_bytes(report, "\n".join(md).encode())
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return report


def _targets(res: dict[str, dict[int, dict[str, Any]]], seeds: list[int], t_mean: float) -> list[str]:
    """Each student against the teachers of its own seeds."""
    out = [f"teacher >= 93 %: {'met' if t_mean >= 0.93 else 'missed'} ({100 * t_mean:.2f} %)"]
    for prefix, label, _, target in STUDENTS:
        if target is None:
            continue
        if prefix not in res:
            out.append(f"{label} within {target} points: not run")
            continue
        own = mean_std([res["teacher"][s]["test_acc"] for s in seeds if s in res[prefix]])[0]
        drop = 100 * (own - mean_std(_acc(res[prefix], seeds))[0])
        out.append(f"{label} within {target} points: {'met' if drop <= target else 'missed'} ({-drop:+.2f})")
    return out


def _speeds(res: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [r["deployed"]["speed"] for jobs in res.values() for r in jobs.values() if "speed" in r.get("deployed", {})]


def _speed_batch(res: dict[str, dict[int, dict[str, Any]]]) -> int | None:
    return next((s["batch"] for s in _speeds(res)), None)


def _speed_device(res: dict[str, dict[int, dict[str, Any]]]) -> str:
    return next((s.get("device", "GPU") for s in _speeds(res)), "")


def _accuracy_plot(path: Path, bars: list[tuple[str, list[float]]], teacher: float) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    means = [mean_std(a)[0] * 100 for _, a in bars]
    ax.barh(range(len(bars)), means, xerr=[mean_std(a)[1] * 100 for _, a in bars], color="tab:blue")
    ax.axvline(teacher * 100, color="k", ls="--", lw=1, label="dense teacher")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_xlim(min(means + [teacher * 100]) - 1.5, max(means + [teacher * 100]) + 0.5)
    ax.set_xlabel("test accuracy (%)")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _bytes_plot(path: Path, rows: list[dict[str, Any]], fp16: int) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['model']}" for r in rows] + ["dense teacher (fp16)"]
    sizes = [r["bytes"] / 1e6 for r in rows] + [fp16 / 1e6]
    ax.barh(range(len(sizes)), sizes, color=["tab:gray"] + ["tab:green"] * (len(rows) - 1) + ["tab:gray"])
    ax.set_yticks(range(len(sizes)), labels, fontsize=7)
    ax.set_xlabel("deployed size (MB)")
    ax.invert_yaxis()
    return save_figure(fig, path)


def _loss_plot(path: Path, runs: list[Run], seed: int) -> str | None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for run in runs:
        by_job = defaultdict(list)
        for r in run.metrics():
            if r["job"].endswith(f"-s{seed}"):
                by_job[r["job"]].append((r["step"], r["loss"]))
        for job, pts in sorted(by_job.items()):
            pts.sort()
            ax.plot(*zip(*pts), label=job, lw=1)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"seed {seed}", fontsize=9)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def format_summary(summary: dict[str, Any]) -> str:
    """The table ``make demo`` prints."""
    lines = [f"{'model':<36s} {'format':>6s} {'test acc %':>11s} {'vs teacher':>10s} {'MB':>7s} {'x<FP32':>7s} {'GPU speed':>10s}"]
    for r in summary["rows"]:
        acc = mean_std(r["acc"])[0] * 100
        spd = f"{np.median(r['gpu_speedup']):.2f}x" if r["gpu_speedup"] else "n/a"
        vs = "" if r["model"] == "dense teacher" else f"{-r['drop_points']:+.2f}"
        lines.append(f"{r['model']:<36s} {r['format']:>6s} {acc:>11.2f} {vs:>10s} {r['bytes'] / 1e6:>7.2f} "
                     f"{r['x_smaller_fp32']:>6.2f}x {spd:>10s}")
    return "\n".join(lines)
