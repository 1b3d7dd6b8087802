"""Video samplers end to end, noise to pixels: the 50-step CFG teacher, dense K-step students, ASA K-step students.

One process, one GPU, random weights (speed does not depend on them), bf16. Each DiT forward is
replayed from a CUDA graph captured once per (model, batch), with the sampler's Euler updates between
replays, so host overhead is gone from every row alike; the dense path is PyTorch's SDPA (the flash
backend at these shapes), ASA rebuilds its mask at every step (mask building included). Our model
works in pixel space (no VAE): noise to pixels is the whole sampler.

Rows per shape and batch:
  teacher-50-cfg   50 Euler steps, classifier-free guidance (a doubled batch: 100 forward passes' work)
  dense-k{K}       a K-step student with dense attention (its steps mix fresh noise in, eta 0.9, as the recipe samples)
  asa-k{K}         the same with ASA (blocks of the model's tile, tau 0.95, keep 5-17 %, 16 sampled queries)
  asa-k{K}-reuse{r} ASA with each layer's mask built at every r-th step and reused in between (``--asa-reuse``;
                   two CUDA graphs, one building and one reading the masks, replayed in turn; its split is the
                   mean over r forwards)
and, beside each, a profiler split of one forward (attention / ASA mask / rest, by kernel names). Every
row runs eagerly and under torch.compile (``--modes``); speedups compare rows of one mode.
Wan2.1-1.3B's shape (21 x 30 x 52 tokens, 30 blocks of width 1536, head dim 128) is timed per forward
only (dense vs ASA at one step: the issue's target is their ratio; 50 CFG steps there take minutes).

    python benchmarks/video_speed.py --out benchmarks/results/video_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.attention import AdaptiveBlockSparseAttention, ASAConfig  # noqa: E402
from sparsedistill.models import create_model  # noqa: E402
from sparsedistill.timing import kernel_times, time_ms  # noqa: E402
from sparsedistill.video.flow import time_grid  # noqa: E402
from sparsedistill.video.tdm import TDMConfig, student_step  # noqa: E402

STUDENT_ETA = TDMConfig().eta  # the students' steps mix fresh noise in, as the recipe trains and samples them
ASA = dict(tau=0.95, min_keep=0.05, max_keep=0.17, samples=16)


class GraphedForward:
    """``model(x, t, y)`` captured once in a CUDA graph for these shapes; calls copy inputs in and replay."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.t, self.y = x.clone(), t.clone(), y.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(s):
            for _ in range(2):  # kernel tuning and lazy set-up happen here, outside capture
                model(self.x, self.t, self.y)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = model(self.x, self.t, self.y)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.y.copy_(y)
        self.graph.replay()
        return self.out


def sampler_ms(fwd: GraphedForward | list[GraphedForward], noise: torch.Tensor, y: torch.Tensor, steps: int,
               cfg: float, null: int, reps: int, eta: float = 1.0) -> float:
    """Median ms of the whole sampler: Euler steps (guidance as one doubled batch), or with ``eta`` < 1 the
    students' steps as the recipe samples them (a share eta of the predicted noise, the rest fresh). A list of
    forwards is cycled, one per step (a mask-building forward, then mask-reusing ones)."""
    times = time_grid(steps, device=noise.device)
    yy = torch.cat([y, torch.full_like(y, null)]) if cfg != 1.0 else y
    fwds = fwd if isinstance(fwd, list) else [fwd]

    def run() -> torch.Tensor:
        x = noise
        for i, (a, b) in enumerate(zip(times[:-1], times[1:])):
            xin = torch.cat([x, x]) if cfg != 1.0 else x
            v = fwds[i % len(fwds)](xin, a.expand(len(xin)), yy)
            if cfg != 1.0:
                vc, vn = v.chunk(2)
                v = vn + cfg * (vc - vn)
            if eta < 1.0:
                x = student_step(x, v, a.expand(len(x)), b.expand(len(x)), eta, torch.randn_like(x))[1]
            else:
                x = x + (b - a) * v
        return x

    return time_ms(run, graph=False, calls=1, reps=reps, warmup=0)  # time_ms runs it once untimed first


def profile_split(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  forwards: int = 1) -> dict[str, float]:
    """Share of GPU kernel time in one eager forward: attention, ASA mask, the rest (by kernel names); with
    ``forwards`` > 1 the mean over that many consecutive forwards (ASA masks reused across them)."""
    asa = [m for m in model.modules() if isinstance(m, AdaptiveBlockSparseAttention)]

    def run() -> None:
        for m in asa:
            m.last_mask = None  # the first forward builds the masks
        for _ in range(forwards):
            model(x, t, y)

    with torch.no_grad():
        kernels = kernel_times(run)
    split = {"attention_ms": 0.0, "mask_ms": 0.0, "rest_ms": 0.0}
    for name, ms in kernels.items():
        ms /= forwards
        name = name.lower()
        if "asa_mask" in name or "pool_kernel" in name:
            split["mask_ms"] += ms
        elif "flash" in name or "fmha" in name or "attention" in name or "_fwd_kernel" in name:
            split["attention_ms"] += ms
        else:
            split["rest_ms"] += ms
    total = sum(split.values()) or 1.0
    return {**{k: round(v, 3) for k, v in split.items()}, **{k.replace("_ms", "_share"): round(v / total, 3) for k, v in split.items()}}


def with_asa(model: torch.nn.Module, reuse: int = 1) -> torch.nn.Module:
    block = model.cfg.block or 128  # raster-ordered models (Wan's shape): blocks of 128, as BLADE
    return model.set_attention(lambda i: AdaptiveBlockSparseAttention(ASAConfig(block=block, **ASA), reuse=reuse))


def graphed_forwards(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     reuse: int = 1) -> list[GraphedForward]:
    """The forwards a sampler cycles through, each its own CUDA graph: one that builds every layer's ASA mask (if
    any), then ``reuse`` - 1 that read the mask tensors the first rewrites at each replay."""
    asa = [m for m in model.modules() if isinstance(m, AdaptiveBlockSparseAttention)]
    for m in asa:
        m.reuse, m.last_mask = 1, None
    build = GraphedForward(model, x, t, y)  # its masks now live in its graph's memory, rewritten per replay
    if reuse == 1:
        return [build]
    build(x, t, y)  # capture ran no kernel: write the masks once before the reading graph's warm-up reads them
    torch.cuda.synchronize()
    for m in asa:
        m.reuse = 2**31  # from here on every call reads them
    read = GraphedForward(model, x, t, y)
    for m in asa:
        m.reuse = reuse
    return [build] + [read] * (reuse - 1)


def random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at zero: give every path weight, as a trained model has
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    return model.to("cuda", torch.bfloat16).eval()


def _error(e: Exception) -> str:
    """A failed row's message: its head and its tail (where Inductor's subprocess errors name the cause); the
    whole traceback goes to stderr."""
    traceback.print_exc()
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 1200 else text[:300] + " ... " + text[-900:]


def bench_trained_shape(name: str, batch: int, students: list[int], reps: int, compiled: bool = False,
                        asa_reuse: tuple[int, ...] = ()) -> list[dict]:
    model = random_model(name)
    c = model.cfg
    noise = torch.randn(batch, c.channels, c.frames, c.height, c.width, device="cuda", dtype=torch.bfloat16)
    y = torch.arange(batch, device="cuda") % c.num_classes
    rows = []
    mode = "compiled" if compiled else "eager"

    def row(variant: str, steps: int, cfg: float, m: torch.nn.Module, reuse: int = 1) -> dict:
        b2 = batch * (2 if cfg != 1.0 else 1)
        x = torch.randn(b2, *noise.shape[1:], device="cuda", dtype=torch.bfloat16)
        t = torch.full((b2,), 0.5, device="cuda")
        yy = torch.arange(b2, device="cuda") % c.num_classes
        if compiled:  # every row compiled alike: static shapes, nothing carried over from the previous row's compile
            torch._dynamo.reset()
        run = torch.compile(m, dynamic=False) if compiled else m  # Inductor's kernels, then the same CUDA graph around them
        fwd = graphed_forwards(run, x, t, yy, reuse)
        r = {"shape": name, "tokens": c.tokens, "batch": batch, "variant": variant, "mode": mode, "steps": steps,
             "cfg": cfg, "ms": sampler_ms(fwd, noise, y, steps, cfg, c.num_classes, reps, eta=1.0 if cfg != 1.0 else STUDENT_ETA),
             **profile_split(run, x, t, yy, forwards=reuse)}
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del fwd
        torch.cuda.empty_cache()
        return r

    def attempt(variant: str, steps: int, cfg: float, reuse: int = 1) -> None:
        try:
            rows.append(row(variant, steps, cfg, model, reuse))
        except Exception as e:  # noqa: BLE001  (report the row's failure and go on)
            rows.append({"shape": name, "batch": batch, "variant": variant, "mode": mode, "error": _error(e)})
            print(rows[-1], flush=True)

    attempt("teacher-50-cfg", 50, 5.0)
    for k in students:
        attempt(f"dense-k{k}", k, 1.0)
    with_asa(model)
    for k in students:
        attempt(f"asa-k{k}", k, 1.0)
        for r in asa_reuse:
            attempt(f"asa-k{k}-reuse{r}", k, 1.0, reuse=r)
    ms = {r["variant"]: r["ms"] for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r and "teacher-50-cfg" in ms:
            r["speedup_vs_teacher"] = ms["teacher-50-cfg"] / r["ms"]
    for r in rows:
        k = r.get("steps")
        if r["variant"].startswith("asa-") and "ms" in r and f"dense-k{k}" in ms:
            r["speedup_vs_dense_same_steps"] = ms[f"dense-k{k}"] / r["ms"]
    return rows


def bench_forward(name: str, batch: int, reps: int) -> list[dict]:
    """One forward (one sampler step without guidance), dense vs ASA."""
    model = random_model(name)
    c = model.cfg
    x = torch.randn(batch, c.channels, c.frames, c.height, c.width, device="cuda", dtype=torch.bfloat16)
    t, y = torch.full((batch,), 0.5, device="cuda"), torch.zeros(batch, dtype=torch.long, device="cuda")
    rows = []
    for variant in ("dense", "asa"):
        if variant == "asa":
            with_asa(model)
        fwd = GraphedForward(model, x, t, y)
        r = {"shape": name, "tokens": c.tokens, "batch": batch, "variant": f"{variant}-forward",
             "ms": sampler_ms(fwd, x, y, 1, 1.0, c.num_classes, reps), **profile_split(model, x, t, y)}
        rows.append(r)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del fwd
        torch.cuda.empty_cache()
    rows[1]["speedup_vs_dense_same_steps"] = rows[0]["ms"] / rows[1]["ms"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/video_speed.json"))
    ap.add_argument("--model", default="video_dit_fmnist", help="the trained shape's registry name")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--students", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-wan", action="store_true", help="skip Wan2.1-1.3B's shape")
    ap.add_argument("--asa-reuse", nargs="*", type=int, default=[2],
                    help="extra ASA rows with each mask serving r steps (none: no such rows)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                    help="eager: PyTorch's kernels; compiled: torch.compile's fused kernels (both in CUDA graphs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("video_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from sparsedistill.runs import environment

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "asa": ASA}
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    rows: list[dict] = []

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))

    for mode in args.modes:
        for batch in args.batches:
            try:
                rows.extend(bench_trained_shape(args.model, batch, args.students, args.reps, compiled=mode == "compiled",
                                                asa_reuse=tuple(args.asa_reuse)))
            except Exception as e:  # noqa: BLE001  (report and go on)
                rows.append({"shape": args.model, "batch": batch, "mode": mode, "error": _error(e)})
            save()
    if not args.no_wan:
        try:
            rows.extend(bench_forward("video_dit_wan_1_3b_shape", 1, args.reps))
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": "video_dit_wan_1_3b_shape", "error": _error(e)})
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
