"""Cooperative detectors' speed on one GPU: inference latency from the fleet's points to boxes, and training frames/s.

Models (DSRC's detector shape, random weights: speed does not depend on them, except NMS's box count, which
the score threshold keeps small): B0 (attention fusion; DSRC's students share its network, plus the
reconstruction head, timed as ``dsrc``), no fusion (the ego alone), early fusion (points merged before pillars).
Frames of the full preset are simulated here first (2-5 agents, 32 x 1024 rays each).

Inference, batch 1 (a car sees one frame at a time), fp32 with TF32 and bf16 autocast, eager (point counts
change every frame, so neither CUDA graphs nor static-shape compilation apply): the median over the frames of
the whole path, and beside it a split timed with a synchronisation between stages (collate: the points into
one batch; forward; post: decoding + NMS), so the remaining time is visible. Training: frames/s of whole
AdamW steps (the batch merged from each frame's kept inputs as the recipe does, forward, loss, backward;
the first visit's whole collate timed beside), B0 and DSRC (teacher forward + distillation +
reconstruction), at the preset's batch and a larger one, in TF32 and bf16 autocast, each with the profiler split of
one step (GPU-busy share of the wall time, top kernels), the host's waits for the GPU in one step (CUDA's sync
debug mode, with the lines behind them) and the host's time to issue a step: where a process leaves the card idle,
and what fills it. ``--layouts nchw nhwc`` times the BEV maps in both memory layouts side by side.

    python benchmarks/dsrc_speed.py --out benchmarks/results/dsrc_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.models import create_model  # noqa: E402
from sparsedistill.perception import LidarConfig, SceneConfig, SimConfig  # noqa: E402
from sparsedistill.perception.anchors import make_anchors, postprocess  # noqa: E402
from sparsedistill.perception.batching import collate, frame_inputs, merge  # noqa: E402
from sparsedistill.perception.frames import simulate_frame, split_seeds  # noqa: E402
from sparsedistill.perception.training import flat_outputs, freeze, student_loss  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402
from sparsedistill.timing import host_sync_sites, kernel_times, top_kernels  # noqa: E402

# name: (input mode, fusion, reconstruction head)
MODELS = {"b0": ("intermediate", "attention", False), "dsrc": ("intermediate", "attention", True),
          "no_fusion": ("intermediate", "none", False), "early": ("early", "attention", False)}


def _sync_ms(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, 1e3 * (time.perf_counter() - t0)


def _host_issue_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    ms = 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    return ms


@torch.no_grad()
def inference_row(name: str, frames: list, precision: str, reps: int, layout: str = "nchw") -> dict:
    inputs, fusion, recon = MODELS[name]
    model = create_model("coop_detector", fusion=fusion, reconstruction=recon, channels_last=layout == "nhwc").cuda().eval()
    grid, acfg = model.cfg.grid, model.cfg.anchors
    anchors = make_anchors(grid, acfg, "cuda").view(-1, 7)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def whole(frame) -> None:
        batch = collate([frame], grid, inputs=inputs, labels=False)
        with amp:
            out = model(batch.points, batch.cloud, batch.agents)
        cls, reg = flat_outputs(out)
        postprocess(cls.float(), reg.float(), anchors, acfg)

    for f in frames[:3]:  # cuDNN's algorithm choice and lazy set-up
        whole(f)
    totals = []
    for _ in range(reps):
        for f in frames:
            totals.append(_sync_ms(lambda: whole(f))[1])
    split = {"collate_ms": [], "forward_ms": [], "post_ms": []}
    for f in frames:
        batch, ms = _sync_ms(lambda: collate([f], grid, inputs=inputs, labels=False))
        split["collate_ms"].append(ms)
        with amp:
            out, ms = _sync_ms(lambda: model(batch.points, batch.cloud, batch.agents))
        split["forward_ms"].append(ms)
        cls, reg = flat_outputs(out)
        _, ms = _sync_ms(lambda: postprocess(cls.float(), reg.float(), anchors, acfg))
        split["post_ms"].append(ms)
    return {"model": name, "kind": "inference", "batch": 1, "precision": precision, "layout": layout,
            "ms": statistics.median(totals),
            "timed_frames": len(totals), **{k: round(statistics.median(v), 3) for k, v in split.items()},
            "parameters": sum(p.numel() for p in model.parameters())}


def training_row(name: str, frames: list, batch_size: int, steps: int, precision: str = "tf32",
                 layout: str = "nchw") -> dict:
    inputs, fusion, recon = MODELS[name]
    torch.manual_seed(0)
    nhwc = layout == "nhwc"
    model = create_model("coop_detector", fusion=fusion, reconstruction=recon, channels_last=nhwc).cuda().train()
    grid, acfg = model.cfg.grid, model.cfg.anchors
    anchors = make_anchors(grid, acfg, "cuda").view(-1, 7)
    teacher = freeze(create_model("coop_detector", in_features=5, channels_last=nhwc).cuda()) if name == "dsrc" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    kept = [frame_inputs(f, grid, anchors, acfg, inputs=inputs, teacher=teacher is not None, reconstruction=recon)
            for f in frames]

    def batch_of(i: int):  # as the recipe trains: every frame's inputs kept after its first visit, merged per step
        return merge([kept[(i * batch_size + j) % len(frames)] for j in range(batch_size)])

    def step(i: int) -> None:
        batch = batch_of(i)
        with amp:
            loss, _ = student_loss(model, batch, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(i)
    times = [_sync_ms(lambda: step(i))[1] for i in range(steps)]
    ms = statistics.median(times)
    merge_ms = statistics.median(_sync_ms(lambda: batch_of(i))[1] for i in range(min(steps, 10)))
    collate_ms = statistics.median(  # a frame's first visit: the whole collate
        _sync_ms(lambda: collate(frames[:batch_size], grid, anchors, acfg, inputs=inputs, teacher=teacher is not None,
                                 reconstruction=recon))[1]
        for _ in range(3))
    waits = host_sync_sites(lambda: step(0))
    # the host's side of a step: from an idle card until the last launch returns. Its waits are included (the card's
    # work queued before each), so read it beside host_sync_sites: with the waits early in the step (the pillars'
    # checks), a value near ms_per_step says the step is bound by launching its ops, not by the card's work
    host_ms = statistics.median(_host_issue_ms(lambda: step(i)) for i in range(min(steps, 10)))
    row = {"model": name, "kind": "training", "batch": batch_size, "precision": precision, "layout": layout,
           "ms_per_step": ms, "frames_per_s": 1e3 * batch_size / ms, "steps": steps, "merge_ms": round(merge_ms, 3),
           "first_visit_collate_ms": round(collate_ms, 3), "host_syncs_per_step": len(waits), "host_sync_sites": waits,
           "host_issue_ms": round(host_ms, 3)}
    try:  # the profiler split of one step: how much of the wall time the GPU is busy, and with what
        kernels = kernel_times(lambda: step(0))
    except Exception as e:  # noqa: BLE001  (a profiler failure is recorded; the timings stay)
        return {**row, "split_error": f"{type(e).__name__}: {e}"[:200]}
    busy = sum(kernels.values())
    return {**row, "gpu_busy_ms": round(busy, 3), "gpu_busy_share": round(busy / ms, 3),
            "top_kernels_ms": top_kernels(kernels, 10)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24, help="simulated test frames the latency cycles over")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-batches", nargs="+", type=int, default=[4, 16], help="4: the full preset's batch")
    ap.add_argument("--train-precisions", nargs="+", default=["tf32", "bf16"], choices=["tf32", "bf16"])
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--no-inference", action="store_true", help="the training rows only")
    ap.add_argument("--layouts", nargs="+", default=["nhwc"], choices=["nchw", "nhwc"],
                    help="the BEV maps' memory layout (nhwc: CoopDetectorConfig.channels_last, the recipe's default), "
                         "each timed in turn")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dsrc_speed.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("dsrc_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True  # as the recipe
    torch.backends.cudnn.allow_tf32 = True
    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    sim = SimConfig(SceneConfig(agents=(2, 5)), LidarConfig(rings=32, azimuths=1024))
    frames = [simulate_frame(s, sim, "cuda") for s in split_seeds("test", args.frames)]
    rows: list[dict] = []

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))

    for name in [] if args.no_inference else MODELS:
        for precision in ("tf32", "bf16"):
            for layout in args.layouts:
                rows.append(inference_row(name, frames, precision, args.reps, layout))
                print(rows[-1], flush=True)
        save()
    for name in ("b0", "dsrc"):
        for batch_size in args.train_batches:
            for precision in args.train_precisions:
                for layout in args.layouts:
                    rows.append(training_row(name, frames, batch_size, args.train_steps, precision, layout))
                    print(rows[-1], flush=True)
                    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
