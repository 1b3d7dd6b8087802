"""Where one training step of `vit compress`'s teacher goes, on one GPU: host-bound or not.

Issue #7's 2-GPU run was slower than one GPU (docs/notes/scaling.md): 13 ms a step at batch 256
for about 0.2 TFLOP. This probe times the library's own loop (`distill.trainer.train`, no run
directory) in one process for variants of the data path and the model, and for each the GPU
kernel time per step from `torch.profiler` (what a loop with no host overhead would approach):

  recipe        rows and crop/flip draws as the recipe makes them (CPU, copied each step)
  no_augment    rows copied each step, no crop/flip
  device_data   the epoch's row order and the crop/flip draws made on the GPU (no copy per step)
  compiled      device_data, model under torch.compile (fewer, fused kernels)
  graphed       device_data, and forward + backward + clip + AdamW captured in one CUDA graph,
                replayed each step (batch copied into static buffers, the learning rate a device
                tensor): no per-kernel host work at all; CUDA only
  trainer_graphed  device_data through the library's own loop with ``TrainConfig.cuda_graph``: should
                match ``graphed`` (the probe's hand-written capture); CUDA only

    python benchmarks/probes/train_step_probe.py --steps 300 --batch 256 --out train_step_probe.json

On a CPU it runs too (tiny --steps), which checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.data import load_fashion_mnist  # noqa: E402
from sparsedistill.data.augment import random_crop_flip  # noqa: E402
from sparsedistill.distill.trainer import TrainConfig, _epoch_order, train  # noqa: E402
from sparsedistill.models import create_model  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402


def batch_fns(x_all: torch.Tensor, y_all: torch.Tensor, batch: int, seed: int) -> dict:
    dev = x_all.device
    n = len(x_all)

    def recipe(rows):  # as Compress.batch: CPU rows and CPU draws, copied every step
        r = rows.to(dev)
        g = torch.Generator().manual_seed(zlib.crc32(rows.numpy().tobytes(), seed))
        return random_crop_flip(x_all[r], g), y_all[r]

    def no_augment(rows):
        r = rows.to(dev)
        return x_all[r], y_all[r]

    order_cache: dict[int, torch.Tensor] = {}
    step = {"i": 0}
    gen = torch.Generator(device=dev)

    def device_data(rows):  # rows of the same kind (a slice of an epoch order), taken on the device
        i = step["i"]
        step["i"] += 1
        epoch, k = divmod(i, n // batch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = _epoch_order(n, seed, epoch).to(dev)  # one copy per epoch
        r = order_cache[epoch][k * batch : (k + 1) * batch]
        gen.manual_seed(seed * 1_000_003 + i)  # host-side seeding: no device read
        return random_crop_flip(x_all[r], gen), y_all[r]

    return {"recipe": recipe, "no_augment": no_augment, "device_data": device_data}


def kernel_ms_per_step(fn, steps: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(steps)
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return total_us / 1e3 / steps


def graphed_trainer(model: torch.nn.Module, get, num_rows: int, batch: int, lr: float = 1e-3, weight_decay: float = 0.05):
    """``run(steps)`` for one CUDA graph per step (forward, backward, grad clip, AdamW), the trainer's schedule and loss."""
    from sparsedistill.distill.trainer import _lr_factor, batch_rows

    params = [p for p in model.parameters() if p.requires_grad]
    lr_t = torch.tensor(lr, device="cuda")
    opt = torch.optim.AdamW(params, lr=lr_t, weight_decay=weight_decay, capturable=True)
    x0, y0 = get(batch_rows(0, num_rows, batch, 0))
    static_x, static_y = x0.clone(), y0.clone()

    def step_body():
        loss = F.cross_entropy(model(static_x), static_y, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: AdamW's state, cuBLAS workspaces
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step_body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step_body()
    done = {"step": 0}

    def run(steps: int) -> None:
        cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr)
        for s in range(steps):
            x, y = get(batch_rows(done["step"], num_rows, batch, 0))
            static_x.copy_(x)
            static_y.copy_(y)
            lr_t.fill_(lr * _lr_factor(s, cfg))
            graph.replay()  # the grads are overwritten, not accumulated: backward in the graph writes them fresh
            done["step"] += 1
        if not torch.isfinite(static_loss):
            raise FloatingPointError("graphed step: loss became non-finite")

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", default="vit_fmnist_tiny")
    ap.add_argument("--variants", nargs="+", default=["recipe", "no_augment", "device_data", "compiled", "graphed", "trainer_graphed"])
    ap.add_argument("--out", type=Path, default=Path("train_step_probe.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = load_fashion_mnist()
    x_all, y_all = data.train_x.to(dev), data.train_y.to(dev)
    result: dict = {"environment": {**environment(), "command": " ".join([sys.executable, *sys.argv])},
                    "model": args.model, "batch": args.batch, "steps": args.steps, "variants": {}}
    for name in args.variants:
        if name in ("graphed", "trainer_graphed") and dev.type != "cuda":
            print(f"{name}: needs CUDA, skipped", flush=True)
            continue
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10).to(dev)
        net = torch.compile(model) if name == "compiled" else model
        get = batch_fns(x_all, y_all, args.batch, seed=0)[name if name in ("recipe", "no_augment", "device_data") else "device_data"]
        ce = lambda m, b: (F.cross_entropy(m(b[0]), b[1], label_smoothing=0.1), {})  # noqa: E731

        def run(steps: int) -> None:
            cfg = TrainConfig(steps=steps, batch_size=args.batch, lr=1e-3, weight_decay=0.05, log_every=50, checkpoint_every=10**9,
                              cuda_graph=name == "trainer_graphed")
            # trainer_graphed captures anew in every call (3 warm-up steps + capture): inside the timed
            # 300 steps that is ~1 % extra, inside the profiled 20 ~15 % extra kernel time
            train(net, ce, get, len(x_all), cfg, job=name, progress=False)

        if name == "graphed":
            model.train()
            run = graphed_trainer(model, get, len(x_all), args.batch)

        run(20)  # warm-up: allocator, cuBLAS handles, compiles
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(args.steps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / args.steps
        r = result["variants"][name] = {"ms_per_step": ms, "samples_per_s": args.batch * 1e3 / ms,
                                        "gpu_kernel_ms_per_step": kernel_ms_per_step(run, 20)}
        print(f"{name:<12} {ms:7.2f} ms/step  {r['samples_per_s']:9.0f} samples/s  kernels {r['gpu_kernel_ms_per_step']} ms/step", flush=True)
        args.out.write_text(json.dumps(result, indent=1))  # after every variant: a timed-out call keeps what ran
    return 0


if __name__ == "__main__":
    sys.exit(main())
