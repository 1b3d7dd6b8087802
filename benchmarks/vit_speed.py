"""Whole-ViT speed on one GPU: dense fp16 vs PyTorch's 2:4 path vs ours (2:4 fp16 / int8 / fp8).

ViT-B/16 and ViT-L/16 at 224x224, throughput at batch 256 and latency at batch 1. Weights are
random but 2:4-pruned in every qkv/proj/fc1/fc2 (speed does not depend on the values); every
variant's logits are checked against the dense fp16 model with the same pruned weights.

  dense_eager / dense_graph / dense_compile   fp16, the baseline is the best of these and the next two
  dense_compile_graphed                      fp16 compiled and in a CUDA graph, as every 8-bit and 2:4 row is (added
                                             2026-12-07: before it the FP16 baseline was compiled or graphed, not both)
  dense_compile_conv_patch                   dense_compile with the patch embedding as the Conv2d (timm's) instead of
                                             the reshape + GEMM every other row uses (models/vit.py PatchEmbed)
  dense_fp8_tensor / dense_fp8_row           dense FP8 E4M3 Linears (weights/dense8.py): per-tensor scales (input
                                             calibrated as ours) or row-wise (dynamic input), torch._scaled_mm
  dense_int8                                 dense W8A8 INT8 (per-row weights, calibrated input), torch._int_mm (its
                                             int32-times-scale left unbroken, Inductor's int_mm-with-mul fusion asked
                                             for where its version has it); every 8-bit row compiled + graphed:
                                             the best of them is the 8-bit baseline
  torch_24 / torch_24_compiled               to_sparse_semi_structured weights, eager / compiled + graphed (PyTorch's path)
  ours_24_{fp16,int8,fp8}                    Sparse24Linear on cuSPARSELt, whole forward in a CUDA graph
  ours_24_{fp16,int8,fp8}_compiled           the same, compiled by Inductor first (fused quantise/dequantise)
  ours_24_int8_fused[_compiled]              int8 with each MLP's fc1 -> GELU -> quantise in cuSPARSELt's epilogue
                                             (Sparse24GeluMlp, weights/cusparselt.py): no bf16 round trip between fc1 and fc2
  ours_24_int8_fused_residual_compiled       the same with proj and fc2 adding the residual stream in their epilogue
                                             (Sparse24Linear.epilogue_residual on; off by default until its GPU test passes;
                                             from residual_min_tokens on: batch 1 keeps the add after)
  ours_24_int8_fused_pass_compiled           the same with every other int8 layer's dequantisation and bias as a separate
                                             pass after its GEMM (Sparse24Linear.epilogue_dequant off: the path before
                                             the epilogue took them), to measure that step

    python benchmarks/vit_speed.py --out benchmarks/results/vit_speed.json
    python benchmarks/vit_speed.py ... --guard benchmarks/results/vit_speed_b16_b256_fp16_plan_h200.json

Every row carries a profiler split of one forward (GPU milliseconds per kernel group, ``KERNEL_GROUPS``, and the top
kernels by name), so the time outside the GEMMs is visible. Each of our rows records the cuSPARSELt plan chosen per
layer shape. ``--guard REF`` compares every
row also in REF (same model, batch and variant) by its speedup over the best dense model, and exits
1 if one fell more than ``--tolerance`` below it: the check that would have caught the fp16 plan
regression of 7a33e7d (0.84x -> 0.48x).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.models import create_model  # noqa: E402
from sparsedistill.weights import nm_mask, swap_linears  # noqa: E402
from sparsedistill.weights import sparse24  # noqa: E402
from sparsedistill.weights.cusparselt import loaded_library  # noqa: E402
from sparsedistill.weights.dense8 import Dense8Linear  # noqa: E402
from sparsedistill.weights.sparse24 import CUDAGraphed, Sparse24Linear, fuse_sparse24_mlps  # noqa: E402
from sparsedistill.timing import kernel_groups, kernel_times, time_ms, top_kernels  # noqa: E402

PRUNED = ("qkv", "proj", "fc1", "fc2")
# kernel name -> group, first match wins (case-insensitive substrings): the split beside every row. cuSPARSELt's 2:4
# kernels come before the dense GEMMs, the patch embedding's convolution and cuDNN's layout transposes too (cuDNN's
# convolutions are "implicit_gemm" kernels).
KERNEL_GROUPS = {
    # Inductor's kernels first: their names list the ops they fused ("..._cslt_mm_...", "..._attention_..."), and
    # counted by those they looked like GEMMs or attention (before 2026-12-07: LayerNorm kernels in "sparse_gemm")
    "gemm_autotuned": ("triton_tem",),  # Inductor's max-autotune GEMM templates (not used by these rows today)
    "fused_triton": ("triton_",),
    "sparse_gemm": ("sparse", "cusparselt", "spgemm"),
    "attention": ("flash", "fmha", "attention", "sdpa"),
    # not "conv" alone: Inductor's names say "convert_element_type"
    "conv": ("convolution", "conv2d", "implicit_gemm", "nchwtonhwc", "nhwctonchw"),
    "gemm": ("gemm", "cutlass", "xmma", "nvjet", "_mm", "addmm", "matmul"),  # nvjet: cuBLAS's sm90 GEMMs
    "eager_elementwise_norm": ("elementwise", "layer_norm", "layernorm", "gelu", "reduce", "softmax"),
    "copies": ("memcpy", "memset", "copy"),
}


def profile_split(fn) -> dict:
    """GPU ms of one call of ``fn`` per kernel group, their sum, and the top kernels (a failure is recorded)."""
    try:
        times = kernel_times(fn)
    except Exception as e:  # noqa: BLE001  (the timing stays; the split says why it is missing)
        return {"split_error": f"{type(e).__name__}: {e}"[:200]}
    return {"gpu_busy_ms": round(sum(times.values()), 3), "split_ms": kernel_groups(times, KERNEL_GROUPS),
            "top_kernels_ms": top_kernels(times, 12)}


def pruned_vit(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PRUNED:
                m.weight.mul_(nm_mask(m.weight))
    return model.half().cuda()


def input_scales(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per-layer absmax of the inputs on the benchmark batch (what calibration would give)."""
    scales, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PRUNED:
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: scales.__setitem__(n, float(inp[0].abs().amax()))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return scales


def ours(model: torch.nn.Module, fmt: str, scales: dict[str, float]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    qmax = {"fp16": 1.0, "int8": 127.0, "fp8": 448.0}[fmt]
    swap_linears(m, lambda n, lin: Sparse24Linear.from_dense(lin.weight, lin.bias, fmt, None if fmt == "fp16" else scales[n] / qmax)
                 if n.rsplit(".", 1)[-1] in PRUNED else None)
    return m


def conv_patch(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.patch_embed.as_gemm = False
    return m


def fused_mlps(model: torch.nn.Module) -> torch.nn.Module:
    if not fuse_sparse24_mlps(model):
        raise RuntimeError("no MLP block was fused")
    return model


def residual_epilogue(model: torch.nn.Module) -> torch.nn.Module:
    """Every 2:4 int8 layer that ends a block's branch adds the residual in cuSPARSELt's epilogue, not in the
    LayerNorm kernel after it."""
    for m in model.modules():
        if isinstance(m, Sparse24Linear):
            m.epilogue_residual = True
    return model


def dequant_pass(model: torch.nn.Module) -> torch.nn.Module:
    """Every 2:4 int8 layer dequantised by a separate pass after its GEMM, not in cuSPARSELt's epilogue."""
    for m in model.modules():
        if isinstance(m, Sparse24Linear):
            m.epilogue_dequant = False
    return model


def dense8(model: torch.nn.Module, fmt: str, granularity: str, scales: dict[str, float] | None) -> torch.nn.Module:
    """The dense 8-bit model a user would deploy instead: the same layers as ours, dense, in FP8 or INT8."""
    m = copy.deepcopy(model)
    swap_linears(m, lambda n, lin: Dense8Linear.from_linear(lin, fmt, scales[n] if scales else None, granularity)
                 if n.rsplit(".", 1)[-1] in PRUNED else None)
    return m


def torch_24(model: torch.nn.Module) -> torch.nn.Module:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    m = copy.deepcopy(model)
    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PRUNED:
            mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
    return m


def bench(name: str, batch: int, compile_dense: bool, variants: set[str] | None, rows: dict[str, dict], save,
          with_dense: bool = True) -> float | None:
    """Fill ``rows`` variant by variant (``save`` after each, so a call cut short keeps what ran); the best dense ms.

    ``with_dense=False`` runs none of the dense rows (no speedups then): for a second process that only compares our rows
    under another cuSPARSELt (LD_PRELOAD), beside a first one that ran the whole table."""
    model = pruned_vit(name)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = model(x).float()

    def add(key: str, build) -> None:
        dense_row = key.startswith("dense")
        if (dense_row and not with_dense) or (not dense_row and variants is not None and key not in variants):
            return
        t0 = time.time()
        sparse24._PLANS.clear()  # so this row records the plans it chose
        try:
            with torch.no_grad():
                fn = build()
                out = fn(x).float()
                err = float((out - ref).norm() / ref.norm())
                rows[key] = {"ms": time_ms(lambda: fn(x), graph=False, calls=5, reps=20), "rel_err_vs_dense": err,
                             **profile_split(lambda: fn(x))}
        except Exception as e:  # noqa: BLE001  (report and go on)
            rows[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rows[key]["setup_s"] = round(time.time() - t0, 1)
        if sparse24._PLANS:  # (fmt, out, in, tokens, ...) -> (transpose_result, algorithm)
            rows[key]["plans"] = {f"{k[0]} {k[1]}x{k[2]} {k[3]} tokens": list(v) for k, v in sparse24._PLANS.items()}
        print(f"  {name} b{batch} {key}: {rows[key]}", flush=True)
        save()

    add("dense_eager", lambda: model)
    add("dense_graph", lambda: CUDAGraphed(model, x))
    if compile_dense:
        add("dense_compile", lambda: torch.compile(model))
        add("dense_compile_graphed", lambda: CUDAGraphed(model, x, compile=True))
        add("dense_compile_conv_patch", lambda: torch.compile(conv_patch(model)))
    add("torch_24", lambda: torch_24(model))
    add("torch_24_compiled", lambda: CUDAGraphed(torch_24(model), x, compile=True))
    scales = input_scales(model, x)
    inductor_config.force_fuse_int_mm_with_mul = True  # int32 GEMM output dequantised in its epilogue
    add("dense_fp8_tensor", lambda: CUDAGraphed(dense8(model, "fp8", "tensor", scales), x, compile=True))
    add("dense_fp8_row", lambda: CUDAGraphed(dense8(model, "fp8", "row", None), x, compile=True))
    add("dense_int8", lambda: CUDAGraphed(dense8(model, "int8", "row", scales), x, compile=True))
    for fmt in ("fp16", "int8", "fp8"):
        add(f"ours_24_{fmt}", lambda fmt=fmt: CUDAGraphed(ours(model, fmt, scales), x))
    for fmt in ("fp16", "int8", "fp8"):  # Inductor fuses (de)quantisation into LayerNorm / GELU / residual
        add(f"ours_24_{fmt}_compiled", lambda fmt=fmt: CUDAGraphed(ours(model, fmt, scales), x, compile=True))
    # fc1 -> GELU -> int8 in cuSPARSELt's epilogue (Sparse24GeluMlp): fc2 reads fc1's int8 output directly
    add("ours_24_int8_fused", lambda: CUDAGraphed(fused_mlps(ours(model, "int8", scales)), x))
    add("ours_24_int8_fused_compiled", lambda: CUDAGraphed(fused_mlps(ours(model, "int8", scales)), x, compile=True))
    add("ours_24_int8_fused_residual_compiled", lambda: CUDAGraphed(residual_epilogue(fused_mlps(ours(model, "int8", scales))),
                                                                    x, compile=True))
    add("ours_24_int8_fused_pass_compiled", lambda: CUDAGraphed(dequant_pass(fused_mlps(ours(model, "int8", scales))), x,
                                                                compile=True))
    dense = [r["ms"] for k, r in rows.items() if k in ("dense_eager", "dense_graph", "dense_compile", "dense_compile_graphed",
                                                        "dense_compile_conv_patch") and "ms" in r]
    best = min(dense) if with_dense and dense else None
    dense8_ms = [r["ms"] for k, r in rows.items() if k.startswith(("dense_fp8", "dense_int8")) and "ms" in r]
    for r in rows.values():
        if "ms" in r and not r["rel_err_vs_dense"] <= WRONG_OUTPUT:  # fast and wrong (or NaN) is no speedup
            r["wrong_output"] = True
        elif "ms" in r:
            if best is not None:
                r["speedup_vs_best_dense"] = best / r["ms"]
            if dense8_ms:
                r["speedup_vs_best_dense_8bit"] = min(dense8_ms) / r["ms"]
            r["images_per_s"] = batch / r["ms"] * 1000
    del model
    torch.cuda.empty_cache()
    return best


# Relative error of the logits against dense fp16 above which a row is not a result: the 8-bit rows are 0.05-0.11;
# a residual dropped by the epilogue gave 1.41 at 11.6 ms (H100, 4b09de4) and was printed as a speedup
WRONG_OUTPUT = 0.25


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vit_speed.json"))
    ap.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[256, 1])
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile for the dense baseline")
    ap.add_argument("--no-dense", action="store_true",
                    help="none of the dense rows (no speedups): our rows under another cuSPARSELt, beside a full run")
    ap.add_argument("--variants", nargs="+", help="only these non-dense variants (e.g. ours_24_int8_compiled); dense always runs")
    ap.add_argument("--guard", type=Path, help="an earlier result JSON: exit 1 if a row's speedup over dense fell below it")
    ap.add_argument("--tolerance", type=float, default=0.1, help="relative speedup loss --guard allows (default 0.1)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("vit_speed.py needs a CUDA GPU with 2:4 sparse tensor cores (Ampere or newer); none was found.", file=sys.stderr)
        return 2
    from sparsedistill.runs import environment

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]),
           "cusparselt": torch.backends.cusparselt.version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:  # the library that ran (LD_PRELOAD can put another version first; the line above is PyTorch's build's)
        env["cusparselt_loaded"] = loaded_library()
    except (RuntimeError, OSError, AttributeError) as e:
        env["cusparselt_loaded"] = f"unknown: {e}"[:200]
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    results = []

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))

    for name in args.models:
        for batch in args.batches:
            row = {"model": name, "batch": batch, "variants": {}}
            results.append(row)
            row["best_dense_ms"] = bench(name, batch, not args.no_compile, set(args.variants) if args.variants else None,
                                         row["variants"], save, with_dense=not args.no_dense)
            save()
    failed = guard(results, json.loads(args.guard.read_text()), args.tolerance) if args.guard else []
    if args.guard:
        env["guard"] = {"reference": str(args.guard), "tolerance": args.tolerance, "regressions": failed}
        save()
    print("\nmodel                   batch  best dense ms  " + "  ".join(f"{k:>14s}" for k in results[0]["variants"]))
    for r in results:
        cells = [f"{'WRONG':>14s}" if v.get("wrong_output") else f"{v['speedup_vs_best_dense']:>13.2f}x" if "speedup_vs_best_dense" in v else
                 f"{v['ms']:>12.2f}ms" if "ms" in v else f"{'ERR':>14s}" for v in r["variants"].values()]
        best = f"{r['best_dense_ms']:>13.2f}" if r["best_dense_ms"] is not None else f"{'-':>13s}"
        print(f"{r['model']:<24s}{r['batch']:>5d}  {best}  " + "  ".join(cells))
    for line in failed:
        print("REGRESSION:", line, file=sys.stderr)
    return 1 if failed else 0


def guard(results: list[dict], reference: dict, tolerance: float) -> list[str]:
    """Rows whose speedup over the best dense model is more than ``tolerance`` below the reference's."""
    ref = {(r["model"], r["batch"], k): v for r in reference["results"] for k, v in r["variants"].items()}
    failed = []
    for r in results:
        for k, v in r["variants"].items():
            old = ref.get((r["model"], r["batch"], k), {}).get("speedup_vs_best_dense")
            if old is None or k.startswith("dense"):
                continue
            new = v.get("speedup_vs_best_dense")
            if new is None or new < old * (1 - tolerance):
                failed.append(f"{r['model']} b{r['batch']} {k}: {new if new is None else round(new, 3)}x, "
                              f"was {old:.3f}x ({reference['environment'].get('commit')})")
    return failed


if __name__ == "__main__":
    sys.exit(main())
