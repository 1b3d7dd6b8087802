"""Data-parallel scaling of the training recipes: the same run on 1, 2, ... processes, side by side.

For each process count the recipe runs under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs) with
the same config, so the same global batch, in its own run directory. From each run:

  vit:        samples/s of every training job (the trainer logs it over the global batch, from
              the end of the first step), test accuracy of every job, and scaling efficiency
              (samples/s on N processes over N x samples/s on 1)
  retrieval:  the same throughput, plus average nonzeros per document of each trained variant
              (the FLOPS term is reduced over the global batch, so sparsity must not change with N)

    python benchmarks/scaling.py vit --procs 1 2 --config full --out benchmarks/results/scaling_vit.json
    python benchmarks/scaling.py retrieval --procs 1 2 --config full --out benchmarks/results/scaling_retrieval.json

Extra ``--set key=value`` pairs go to every run (e.g. shorter schedules for a first look).
On GPUs keep NVLink multicast off (NCCL_NVLS_ENABLE=0, set here unless the caller sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.runs import environment  # noqa: E402


def run_recipe(recipe: str, procs: int, config: str, overrides: list[str], run_dir: Path, resume: bool) -> float:
    """One ``torchrun`` of the recipe; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "sparsedistill.cli", recipe, "train" if recipe == "retrieval" else "compress",
           "--config", config, "--run-dir", str(run_dir), "--no-progress"]
    if resume:
        cmd.append("--resume")
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (run_dir / "torchrun.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {run_dir / 'torchrun.log'}")
    return time.time() - t0


def summarize(run_dir: Path) -> dict:
    """Per job: the last logged samples/s, and the numbers of its result file."""
    jobs: dict[str, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "samples_per_s" in row:
            jobs.setdefault(row["job"], {})["samples_per_s"] = row["samples_per_s"]
    for f in sorted((run_dir / "results").glob("*.json")):
        res = json.loads(f.read_text())
        flat = {**res, **{f"{k}_{m}": v for k, d in res.items() if isinstance(d, dict) for m, v in d.items()}}  # e.g. ours_ndcg@10
        keep = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and
                any(s in k for s in ("acc", "nnz", "ndcg", "recall", "seconds"))}
        jobs.setdefault(f.stem, {}).update(keep)
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", choices=["vit", "retrieval"])
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--config", default="full")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs", type=Path, default=Path("runs/scaling"), help="where the run directories go")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: summarise run directories already under --runs (e.g. copied back from "
                         "the GPU machine after a call ran out of time); each run's environment.json is kept")
    ap.add_argument("--resume", action="store_true",
                    help="continue run directories that already exist (finished jobs are skipped and keep "
                         "their logged samples/s), so the process counts can be split over several calls")
    args = ap.parse_args()
    out = args.out or Path(f"benchmarks/results/scaling_{args.recipe}.json")
    import torch

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]),
           "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]}
    if args.collect:  # this machine only read the files; each run's own environment names its cards
        env["devices"] = "see runs.*.run_environment"
    result: dict = {"environment": env, "recipe": args.recipe, "config": args.config, "overrides": args.overrides, "runs": {}}
    for n in args.procs:
        run_dir = args.runs / f"{args.recipe}-{args.config}-p{n}"
        if args.collect:
            if not (run_dir / "metrics.jsonl").exists():
                print(f"{run_dir}: no metrics.jsonl, skipped", flush=True)
                continue
            run_env = json.loads((run_dir / "environment.json").read_text())  # the machine that trained it
            result["runs"][str(n)] = {"collected": True, "run_environment": run_env, "run_dir": str(run_dir),
                                      "jobs": summarize(run_dir)}
        else:
            resumed = args.resume and (run_dir / "metrics.jsonl").exists()
            wall = run_recipe(args.recipe, n, args.config, args.overrides, run_dir, resumed)
            # a resumed run's wall time covers only what was left; samples/s come from the log either way
            result["runs"][str(n)] = {"wall_s": wall, "resumed": resumed, "run_dir": str(run_dir), "jobs": summarize(run_dir)}
        base = result["runs"].get(str(args.procs[0]))
        for job, r in result["runs"][str(n)]["jobs"].items():
            b = base["jobs"].get(job, {}) if base else {}
            if "samples_per_s" in r and "samples_per_s" in b:
                r["speedup_vs_first"] = r["samples_per_s"] / b["samples_per_s"]
                r["scaling_efficiency"] = r["speedup_vs_first"] * args.procs[0] / n
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"{n} process(es): " + ("collected" if args.collect else f"{wall:.0f} s"), flush=True)
        for job, r in result["runs"][str(n)]["jobs"].items():
            print(f"  {job:<22} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
