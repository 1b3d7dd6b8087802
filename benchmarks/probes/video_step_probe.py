"""What a training step of `video run`'s networks costs on one GPU, per candidate model shape.

Sizes the full preset: the teacher's flow-matching step (batch 16, bf16 autocast, AdamW, as the
recipe trains it) and one TDM iteration (K = 4, batch 8, dense and with ASA), each the median of
timed steps after warm-up steps, for a few shapes of the video DiT. Random weights and clips.

    python benchmarks/probes/video_step_probe.py --out video_step_probe.json

On a CPU it runs the tiny model for a couple of steps (checks the script, not the speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.models import create_model  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402
from sparsedistill.video.flow import flow_matching_loss  # noqa: E402
from sparsedistill.video.tdm import TDMTrainConfig, train_tdm  # noqa: E402

SHAPES = {  # name: (registry model, overrides)
    "8k-d256-h4": ("video_dit_fmnist", dict(frames=8, tile=(2, 8, 8), dim=256, depth=8, heads=4)),
    "8k-d384-h6": ("video_dit_fmnist", dict(frames=8, tile=(2, 8, 8), dim=384, depth=8, heads=6)),
    "16k-d384-h6": ("video_dit_fmnist", dict(frames=16, tile=(1, 8, 8), dim=384, depth=8, heads=6)),
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def teacher_step_ms(model: torch.nn.Module, batch: int, steps: int, warmup: int, dev: torch.device) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c = model.cfg
    x0 = torch.rand(batch, c.channels, c.frames, c.height, c.width, device=dev) * 2 - 1
    y = torch.randint(c.num_classes, (batch,), device=dev)
    times = []
    for i in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = flow_matching_loss(model, x0, y, c.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tdm_iteration_ms(teacher: torch.nn.Module, asa: bool, iterations: int, dev: torch.device) -> float:
    from sparsedistill.attention import AdaptiveBlockSparseAttention, ASAConfig

    student = copy.deepcopy(teacher).requires_grad_(True).train()
    if asa:
        cfg = ASAConfig(block=teacher.cfg.block, tau=0.95, min_keep=0.05, max_keep=0.17, samples=16)
        student.set_attention(lambda i: AdaptiveBlockSparseAttention(cfg, reference=dev.type == "cpu"))
    fake = copy.deepcopy(student)
    out = []
    for n in (1, 1 + iterations):  # the first call's time (warm-up) is subtracted from the second's
        s, f = copy.deepcopy(student), copy.deepcopy(fake)
        sync(dev)
        t0 = time.perf_counter()
        train_tdm(s, f, teacher, teacher.cfg.num_classes, TDMTrainConfig(steps=4, iterations=n, batch_size=8),
                  job="probe", progress=False)
        sync(dev)
        out.append(time.perf_counter() - t0)
    return (out[1] - out[0]) / iterations * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("video_step_probe.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = {n: SHAPES[n] for n in args.shapes} if dev.type == "cuda" else {"tiny": ("video_dit_fmnist_tiny", {})}
    steps = args.steps if dev.type == "cuda" else 1
    rows = []
    for name, (model_name, kw) in shapes.items():
        torch.manual_seed(0)
        model = create_model(model_name, **kw).to(dev)
        row = {"shape": name, "model": model_name, "overrides": kw, "tokens": model.cfg.tokens,
               "parameters": sum(p.numel() for p in model.parameters())}
        row["teacher_step_ms_b16"] = teacher_step_ms(model, 16 if dev.type == "cuda" else 2, steps, 3 if steps > 1 else 0, dev)
        model.eval()
        for asa in (False, True):
            row[f"tdm_iteration_ms_k4_b8{'_asa' if asa else ''}"] = tdm_iteration_ms(model, asa, max(steps // 3, 1), dev)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"environment": environment(), "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
