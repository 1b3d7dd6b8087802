"""Why is the 2:4 fp16 ViT-B 2x slower than dense when its GEMMs are faster? (issue #3)

`vit_speed.py` on the H200 (benchmarks/results/vit_speed_b16_h200.json): ViT-B/16 at batch 256,
dense 23.1 ms, ours 2:4 fp16 47.8 ms compiled, while `gemm_24.py` timed the fp16 2:4 GEMMs
1.09-1.39x faster than dense (column-major result, no bias, no copy). For each ViT-B Linear shape
at 50,432 tokens this times, in CUDA graphs, every way `Sparse24Linear` can call cuSPARSELt:

  dense                      F.linear(x, w, b)
  colmajor[_bias][_copy]     searched algorithm, column-major result (+ bias in the epilogue, + the transposing copy)
  rowmajor_alg0[_bias]       transpose_result=True, algorithm 0 (the fp16 search fails with it)
  layer                      Sparse24Linear.forward as the model calls it, with the plan it picked

then times graphed forwards of the whole ViT-B (dense compiled; 2:4 fp16 eager and compiled, with the
transposing copy or with column-major views, ``Sparse24Linear.column_major_views``; int8 compiled),
and profiles three of them, listing each one's costliest kernels (where the time goes).

    python benchmarks/probes/fp16_24_probe.py --out fp16_24_probe.json [--sections shapes models profiles]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemm_24 import layers, prune_24  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402
from sparsedistill.timing import time_ms  # noqa: E402
from sparsedistill.weights.sparse24 import _PLANS, CUDAGraphed, Sparse24Linear  # noqa: E402


def shape_rows(out_f: int, in_f: int, tokens: int) -> dict:
    w = prune_24(torch.randn(out_f, in_f, dtype=torch.float16) / in_f**0.5).cuda()
    b = torch.randn(out_f, dtype=torch.float16).cuda()
    x = torch.randn(tokens, in_f, dtype=torch.float16).cuda()
    ref = F.linear(x.float(), w.float(), b.float())
    wc = torch._cslt_compress(w)
    alg = torch._cslt_sparse_mm_search(wc, x.t(), transpose_result=False)
    mm = torch._cslt_sparse_mm
    ways = {
        "dense": lambda: F.linear(x, w, b),
        "colmajor": lambda: mm(wc, x.t(), alg_id=alg),
        "colmajor_bias": lambda: mm(wc, x.t(), bias=b, alg_id=alg),
        "colmajor_bias_copy": lambda: mm(wc, x.t(), bias=b, alg_id=alg).t().contiguous(),
        "rowmajor_alg0": lambda: mm(wc, x.t(), transpose_result=True, alg_id=0),
        "rowmajor_alg0_bias": lambda: mm(wc, x.t(), bias=b, transpose_result=True, alg_id=0),
    }
    layer = Sparse24Linear.from_dense(w, b, "fp16").cuda()
    layer(x)  # picks the plan
    ways["layer"] = lambda: layer(x)
    rows: dict = {"out": out_f, "in": in_f, "tokens": tokens, "searched_alg": alg,
                  "layer_plan_transposed_alg": list(layer._plans[(tokens, None, False)])  # (tokens, out dtype, alpha in the epilogue)}
    for name, fn in ways.items():
        try:
            y = fn()
            if name in ("dense", "layer", "colmajor_bias_copy", "rowmajor_alg0_bias"):
                rows[f"{name}_rel_err"] = float((y.float() - ref).norm() / ref.norm())
            rows[f"{name}_ms"] = time_ms(fn, graph=True, calls=10, reps=20)
        except Exception as e:  # noqa: BLE001  (report and go on)
            rows[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows.items()}, flush=True)
    return rows


def profile_model(batch: int, fmt: str | None, compile: bool) -> list[dict]:
    """The 15 costliest kernels of one graphed ViT-B forward: dense (``fmt`` None) or ours in ``fmt``."""
    from torch.profiler import ProfilerActivity, profile

    from vit_speed import input_scales, ours, pruned_vit

    model = pruned_vit("vit_base_patch16_224")
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    net = model if fmt is None else ours(model, fmt, input_scales(model, x))
    graphed = CUDAGraphed(net, x, compile=compile)
    graphed(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graphed(x)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    top = [{"kernel": e.key[:160], "calls_per_forward": e.count / 5, "ms_per_forward": e.device_time_total / 1e3 / 5} for e in events[:15]]
    for t in top:
        print(f"  {t['ms_per_forward']:8.3f} ms  x{t['calls_per_forward']:5.1f}  {t['kernel']}", flush=True)
    return top


MODELS = ("dense-compiled", "fp16-graphed", "fp16-compiled", "fp16-compiled-views", "fp16-graphed-views", "int8-compiled")


def model_ms(batch: int, fmt: str | None, compile: bool, views: bool = False) -> dict:
    """Milliseconds per graphed ViT-B forward, and the logits' error against the dense fp16 model."""
    from vit_speed import input_scales, ours, pruned_vit

    Sparse24Linear.column_major_views = views
    _PLANS.clear()
    try:
        model = pruned_vit("vit_base_patch16_224")
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            ref = model(x).float()
        net = model if fmt is None else ours(model, fmt, input_scales(model, x))
        graphed = CUDAGraphed(net, x, compile=compile)
        err = float((graphed(x).float() - ref).norm() / ref.norm())
        row = {"fmt": fmt or "dense", "compile": compile, "column_major_views": views,
               "ms": time_ms(lambda: graphed(x), graph=False, calls=5, reps=20), "rel_err_vs_dense": err}
    finally:
        Sparse24Linear.column_major_views = False
        _PLANS.clear()
    print(row, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256 * 197)
    ap.add_argument("--out", type=Path, default=Path("fp16_24_probe.json"))
    ap.add_argument("--sections", nargs="+", default=["shapes", "models", "profiles"], choices=["shapes", "models", "profiles"])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="the whole-ViT-B variants the models section times")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fp16_24_probe.py needs a CUDA GPU; none was found.", file=sys.stderr)
        return 2
    result: dict = {"environment": {**environment(), "command": " ".join([sys.executable, *sys.argv])}, "shapes": []}
    for name, (out_f, in_f) in layers(768, 3072).items() if "shapes" in args.sections else []:
        result["shapes"].append({"layer": name, **shape_rows(out_f, in_f, args.tokens)})
        args.out.write_text(json.dumps(result, indent=1))
    batch = args.tokens // 197
    result["vit_b16_models"] = []
    for name in args.models if "models" in args.sections else []:
        fmt, mode, *views = name.split("-")
        fmt, comp, views = (None if fmt == "dense" else fmt), mode == "compiled", bool(views)
        try:
            result["vit_b16_models"].append({"batch": batch, **model_ms(batch, fmt, comp, views)})
        except Exception as e:  # noqa: BLE001  (report and go on)
            result["vit_b16_models"].append({"fmt": fmt, "compile": comp, "column_major_views": views, "error": f"{type(e).__name__}: {e}"[:300]})
            print(result["vit_b16_models"][-1], flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    for key, fmt, comp in [("dense_compiled", None, True), ("ours_24_fp16_graphed", "fp16", False),
                           ("ours_24_int8_compiled", "int8", True)] if "profiles" in args.sections else []:
        print(f"ViT-B/16 b{args.tokens // 197} {key}: costliest kernels per forward", flush=True)
        result[f"vit_b16_{key}_kernels"] = profile_model(args.tokens // 197, fmt, comp)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
