"""End to end: the real CLI on a small slice of real Fashion-MNIST."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedistill.cli import main

TINY = [
    "--set", "seeds=[0, 1]", "--set", "data.train_subset=2000", "--set", "data.test_subset=1000",
    "--set", "teacher.steps=150", "--set", "student.steps=40", "--set", "teacher.batch_size=128",
    "--set", "student.batch_size=128", "--set", "sparsity.stages=[1, 2]", "--set", "access.topk=[2]",
    "--set", "operators.reference_temperatures=[3.0]", "--no-progress",
]


def _command_paths(parser, prefix=()):
    """Every command path of the CLI (argparse's subparser tree), e.g. ("vit", "compress")."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


def test_help_everywhere(capsys):
    from sparsedistill.cli import build_parser

    paths = list(_command_paths(build_parser()))
    assert ("perception", "run") in paths and ("video", "report") in paths and len(paths) > 20
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0, path
        assert "usage: sparsedistill" in capsys.readouterr().out, path


def test_axioms_command_passes():
    assert main(["kd", "axioms", "--rows", "32"]) == 0


def test_bad_override_is_a_clear_error(capsys, tmp_path):
    assert main(["kd", "experiment", "--set", "student.stepz=3", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown config key(s) ['stepz']" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_writes_report_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["kd", "experiment", "--run-dir", str(run_dir), *TINY]) == 0
    report = (run_dir / "report.md").read_text()
    for section in ("(a) KD vs cross-entropy", "(b) One-shot vs n-stage", "(c) Teacher access", "(d) Softening operators"):
        assert section in report
    for png in ("kd_vs_ce.png", "multistage.png", "teacher_access.png", "operators.png", "curves.png"):
        assert (run_dir / png).stat().st_size > 1000
    assert "Bias-variance" in report  # two seeds give a variance
    results = {p.name: p.stat().st_mtime_ns for p in (run_dir / "results").iterdir()}
    teacher = json.loads((run_dir / "results" / "teacher-s0.json").read_text())
    assert teacher["test_rows"] == 1000 and teacher["test_acc"] > 0.6  # real data, a real (short) teacher
    student = json.loads((run_dir / "results" / "u90-full-s0.json").read_text())
    assert abs(student["sparsity"] - 0.9) < 0.01
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["teacher_acc"]) == 2
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["command"].startswith("sparsedistill kd experiment --run-dir")

    # Without --resume an existing run is protected; with it, finished jobs are not rerun.
    assert main(["kd", "experiment", "--run-dir", str(run_dir), *TINY]) == 2
    assert main(["kd", "experiment", "--run-dir", str(run_dir), "--resume", *TINY]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "results").iterdir()} == results
    # every job is a function of its config alone: seed 1's students redone after its teacher was loaded (not
    # trained) in this process come out the same to the last digit
    from _helpers import redo_jobs

    students = sorted(p.stem for p in (run_dir / "results").glob("*-s1.json") if p.stem != "teacher-s1")
    assert students
    before, after = redo_jobs(run_dir, students, lambda: main(["kd", "experiment", "--run-dir", str(run_dir), "--resume", *TINY]))
    assert after == before


def test_console_script_is_installed():
    exe = shutil.which("sparsedistill", path=str(Path(sys.executable).parent))
    assert exe, "the sparsedistill console script is not installed next to this Python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "kd" in out.stdout


def test_log_level_from_the_environment(capsys):
    import logging

    from sparsedistill.cli import _configure_logging

    log = logging.getLogger("sparsedistill")
    before = (log.level, list(log.handlers))
    try:
        _configure_logging("not-a-level")  # a clear note, no crash
        assert "not a logging level" in capsys.readouterr().err
        _configure_logging("info")
        assert log.getEffectiveLevel() == logging.INFO
        _configure_logging("10")
        assert log.level == logging.DEBUG and len(log.handlers) == len(before[1]) + 1
    finally:
        log.setLevel(before[0])
        log.handlers[:] = before[1]
