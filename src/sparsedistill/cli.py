"""``sparsedistill`` command line: one subcommand per system, each with its own ``--help``.

Systems register here as their recipes land (``kd`` today; ``vit``, ``attention``,
``indexcache``, ``retrieval``, ``video`` and ``perception`` follow their issues).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _add_run_options(p: argparse.ArgumentParser, preset_help: str) -> None:
    p.add_argument("--config", help=f"TOML file or preset name ({preset_help})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set student.steps=800 --set seeds=[0,1] (repeatable)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/<command>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (or the latest run), skipping finished jobs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_dir(args: argparse.Namespace, prefix: str) -> Path:
    """The run directory, decided on rank 0 so that every ``torchrun`` rank uses the same one."""
    from . import distributed as dist
    from .runs import latest_run

    dist.init()
    if args.run_dir:
        return args.run_dir
    if args.resume:
        latest = latest_run(Path("runs"), prefix)
        if latest is None:
            raise SystemExit(f"--resume: no earlier {prefix} run under runs/; pass --run-dir")
        return latest
    return dist.broadcast_object(Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def _kd_experiment(args: argparse.Namespace) -> int:
    from .config import load_config
    from .recipes.kd_experiment import ExperimentConfig, run_experiment

    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    run_dir = _run_dir(args, "kd-experiment")
    command = "sparsedistill " + shlex.join(args.argv)
    report = run_experiment(cfg, run_dir, resume=args.resume, progress=not args.no_progress, command=command)
    from .recipes.kd_report import format_summary

    print(format_summary(json.loads((report.parent / "summary.json").read_text())))
    print(f"report: {report}")
    return 0


def _kd_axioms(args: argparse.Namespace) -> int:
    import torch

    from .distill import OPERATORS, check_axioms

    g = torch.Generator().manual_seed(args.seed)
    p = torch.softmax(torch.randn(args.rows, args.classes, generator=g, dtype=torch.float64) * 3, -1)
    failed = 0
    for op in OPERATORS.values():
        report = check_axioms(op, p)
        failed += not report.ok
        print(report)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedistill", description="Distill dense teachers into sparse students that are really faster.")
    systems = parser.add_subparsers(dest="system", required=True, metavar="SYSTEM")

    kd = systems.add_parser("kd", help="the distillation core (softening operators, sparse KD, multi-stage compression)")
    kd_cmds = kd.add_subparsers(dest="command", required=True, metavar="COMMAND")
    exp = kd_cmds.add_parser("experiment", help="teacher + sparse students on Fashion-MNIST, with report.md and plots",
                             description="Train a dense teacher and sparse students on Fashion-MNIST and write a report "
                                         "(KD vs CE, multi-stage vs one-shot, teacher access modes, softening operators).")
    _add_run_options(exp, "'full' (default, 3 seeds) or 'short' (1 seed, a few minutes on 2 CPU cores)")
    exp.set_defaults(func=_kd_experiment)
    ax = kd_cmds.add_parser("axioms", help="check the five softening axioms numerically for every operator")
    ax.add_argument("--rows", type=int, default=256)
    ax.add_argument("--classes", type=int, default=10)
    ax.add_argument("--seed", type=int, default=0)
    ax.set_defaults(func=_kd_axioms)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in each run's environment.json
    from . import distributed

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sparsedistill: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
