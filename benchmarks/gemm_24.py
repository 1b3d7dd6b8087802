"""2:4 sparse vs dense GEMMs at ViT shapes on one GPU, side by side in one process.

For every Linear of ViT-B/16 and ViT-L/16 (qkv, proj, fc1, fc2) at batch 256 (50,432 tokens)
and batch 1 (197 tokens), times ``Y = X W^T`` as:

  dense fp16        cuBLAS through F.linear
  dense int8        torch._int_mm (int32 out)
  dense fp8         torch._scaled_mm, E4M3, fp16 out
  torch 2:4 fp16    to_sparse_semi_structured + F.linear, eager (what users call today)
  2:4 fp16/int8/fp8 torch._cslt_sparse_mm on a compressed weight with the algorithm searched once

Each variant is timed eager and inside a CUDA graph (the graph removes the per-call host cost
that cuSPARSELt pays for re-creating its plan). Every variant is first checked against a
float64 reference on the same inputs. Medians of many graph replays, CUDA events.

    python benchmarks/gemm_24.py --out benchmarks/results/gemm_24.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.runs import environment as run_environment  # noqa: E402
from sparsedistill.timing import time_ms  # noqa: E402

VIT = {  # name: (width, mlp width)
    "vit_b16": (768, 3072),
    "vit_l16": (1024, 4096),
}
TOKENS = {"batch256": 256 * 197, "batch1": 197}


def layers(width: int, mlp: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Linear in a ViT block."""
    return {"qkv": (3 * width, width), "proj": (width, width), "fc1": (mlp, width), "fc2": (width, mlp)}


def prune_24(w: torch.Tensor) -> torch.Tensor:
    g = w.float().abs().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True)
    return w * keep.reshape(w.shape).to(w.dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def bench_shape(M: int, K: int, N: int, results: list, tag: dict) -> None:
    dev = "cuda"
    # Inputs drawn on the CPU: a failed graph capture must not leave the CUDA generator mid-capture.
    w = prune_24(torch.randn(M, K, dtype=torch.float16) / K**0.5).to(dev)
    x = torch.randn(N, K, dtype=torch.float16).to(dev)
    ref = x.double() @ w.double().t()
    rows = {}

    def add(name: str, fn, out_fn=None, tol: float = 1e-2, graph_ok: bool = True) -> None:
        t0 = time.time()
        try:
            out = (out_fn or fn)()
            err = rel_err(out.float(), ref)
            ok = err < tol
            eager = time_ms(fn, graph=False)
            graphed = time_ms(fn, graph=True) if graph_ok else None
            rows[name] = {"eager_ms": eager, "graph_ms": graphed, "rel_err": err, "correct": ok}
        except Exception as e:  # noqa: BLE001  (report what failed and go on)
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name}: {rows[name]['error']}", flush=True)
        rows[name]["bench_seconds"] = round(time.time() - t0, 2)

    add("dense_fp16", lambda: F.linear(x, w))

    # int8: symmetric per-tensor scales, so the reference error includes quantisation.
    sx, sw = x.abs().amax().float() / 127, w.abs().amax().float() / 127
    x8 = (x.float() / sx).round().clamp(-127, 127).to(torch.int8)
    w8 = (w.float() / sw).round().clamp(-127, 127).to(torch.int8)
    add("dense_int8", lambda: torch._int_mm(x8, w8.t()), lambda: torch._int_mm(x8, w8.t()).float() * sx * sw, tol=0.05)

    # fp8 e4m3 with per-tensor scales.
    fx, fw = x.abs().amax().float() / 448, w.abs().amax().float() / 448
    xf8 = (x.float() / fx).to(torch.float8_e4m3fn)
    wf8 = (w.float() / fw).to(torch.float8_e4m3fn)
    add("dense_fp8", lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=fx, scale_b=fw, out_dtype=torch.float16), tol=0.08)

    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        ws = to_sparse_semi_structured(w)
        add("torch_24_fp16", lambda: F.linear(x, ws), graph_ok=False)
    except Exception as e:  # noqa: BLE001
        rows["torch_24_fp16"] = {"error": f"{type(e).__name__}: {e}"[:300]}

    # cuSPARSELt wants the token count padded to a multiple of 16 (197 tokens -> 208).
    pad = (-N) % 16

    def cslt(name: str, wq: torch.Tensor, xq: torch.Tensor, scale: torch.Tensor | None, tol: float, out_dtype) -> None:
        """``Y^T = W X^T`` on cuSPARSELt, algorithm searched once.

        Scales are applied after the call: passing them as cuSPARSELt's ``alpha`` breaks CUDA-graph
        capture, and a fused scale belongs in the next kernel anyway. The transposed-result form
        is not used: its search fails for fp16 and its eager call took 280 ms (probes/cslt_probe.py).
        """
        try:
            xp = torch.cat([xq, xq[:pad]]) if pad else xq
            wc = torch._cslt_compress(wq)
            alg = torch._cslt_sparse_mm_search(wc, xp.t(), out_dtype=out_dtype)
            fn = lambda: torch._cslt_sparse_mm(wc, xp.t(), out_dtype=out_dtype, alg_id=alg)  # noqa: E731
            post = 1.0 if scale is None else scale
            add(name, fn, lambda: fn()[:, :N].t().float() * post, tol=tol)
            rows[name].update(alg_id=alg, padded_tokens=N + pad)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name}: {rows[name]['error']}", flush=True)

    cslt("ours_24_fp16", w, x, None, 1e-2, None)
    cslt("ours_24_int8", w8, x8, sx * sw, 0.05, torch.bfloat16)
    cslt("ours_24_fp8", wf8, xf8, fx * fw, 0.08, torch.bfloat16)

    base = rows["dense_fp16"].get("graph_ms")
    for name, r in rows.items():
        if base and r.get("graph_ms"):
            r["speedup_vs_dense_fp16_graph"] = base / r["graph_ms"]
        if base and r.get("eager_ms"):
            r["speedup_eager_vs_dense_fp16_graph"] = base / r["eager_ms"]
    results.append({**tag, "M": M, "K": K, "N": N, "variants": rows})


def environment() -> dict:
    env = {
        **run_environment(),
        "command": " ".join([sys.executable, *sys.argv]),
        "cuda_runtime": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # The device copy of the tree has no .git: the caller passes the commit in SPARSEDISTILL_COMMIT.
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm_24.json"))
    ap.add_argument("--models", nargs="+", default=list(VIT))
    ap.add_argument("--max-shapes", type=int, default=0, help="stop after this many shapes (0: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gemm_24.py needs a CUDA GPU (2:4 sparse tensor cores: Ampere or newer); none was found.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results: list = []
    for model in args.models:
        for layer, (M, K) in layers(*VIT[model]).items():
            for batch, N in TOKENS.items():
                bench_shape(M, K, N, results, {"model": model, "layer": layer, "batch": batch})
                r = results[-1]["variants"]
                line = "  ".join(
                    f"{k}={v['graph_ms'] * 1000:.0f}us" if v.get("graph_ms") else f"{k}=ERR" if "error" in v else f"{k}={v['eager_ms'] * 1000:.0f}us(eager)"
                    for k, v in r.items()
                )
                print(f"{model} {layer:4s} {batch:8s} {line}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"environment": environment(), "results": results}, indent=1))
                if args.max_shapes and len(results) >= args.max_shapes:
                    return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
