"""Two gloo processes under torchrun reach the same weights as one process on the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_process_ddp_matches_single_process(tmp_path):
    _run([sys.executable, str(WORKER), str(tmp_path / "one.pt")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), str(tmp_path / "two.pt")], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for part in ("student", "hint"):
        for k in one[part]:
            assert torch.allclose(one[part][k], two[part][k], atol=1e-5), (part, k)
    assert (two["student"]["0.weight"] == 0).float().mean() >= 0.5  # masks held under DDP too
    # rank 0 alone logs; the logged metrics are reduced over ranks and equal the global ones
    rows = lambda name: [json.loads(l) for l in (tmp_path / f"run-{name}" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    r1, r2 = rows("one"), rows("two")
    assert [r["step"] for r in r2] == [10, 20, 30]
    for a, b in zip(r1, r2):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["hint"] - b["hint"]) < 1e-4
        assert a["samples_per_s"] > 0 and b["samples_per_s"] > 0  # throughput over the global batch, for scaling tables
