"""ASA (Video-BLADE's adaptive block-sparse attention) against dense SDPA, mask building included.

Per shape (batch, heads, tokens, head dim, block) and kept share, in one process on one GPU:

  sdpa_ms            dense ``scaled_dot_product_attention`` (the flash backend where it applies): the baseline
  mask_ms            ``asa_mask``: key pooling + the fused scoring / selection kernel
  mask_two_pass_ms   the same with the selection kernel's two-pass form (the one-pass form's baseline)
  sparse_ms          ``block_sparse_attention`` over that mask
  pooled_ms          the pooled-KV branch for the dropped blocks and the log-sum-exp merge (``asa_attention``
                     with ``pooled_kv`` minus the sparse part; reported where the fp32 scores fit memory)
  asa_ms             mask + sparse attention, as one CUDA graph (what a denoising step replays)
  asa_pooled_ms      the same with the pooled branch
  mask_share         mask_ms / sparse_ms (the issue's target: <= 0.10)

Inputs are random, views of one (B, S, 3, H, D) projection as a model hands them over (SDPA gets the same
views); block scores are flat, so ``max_keep`` sets the kept share (``--keep``);
the kept share of trained models comes from the video recipe's report. Times are medians of CUDA
event timings (``sparsedistill.timing.time_ms``).

    python benchmarks/asa_speed.py --out benchmarks/results/asa_speed_h200.json
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
from sparsedistill.attention import asa_attention, asa_mask, block_sparse_attention  # noqa: E402
from sparsedistill.timing import time_ms  # noqa: E402

# (name, batch, heads, tokens, head dim): the video recipe's trained shape, and Wan2.1-1.3B's attention
# (21 x 30 x 52 = 32,760 latent tokens, 12 heads of 128, padded to a multiple of the block)
SHAPES = {
    "fmnist-dit": (16, 4, 8192, 64),  # the recipe's video_dit_fmnist at batch 16 (blocks of 128)
    "video-16k-d64": (1, 8, 16384, 64),
    "video-16k-d128": (1, 8, 16384, 128),
    "wan-1.3b": (1, 12, 32768, 128),
}


def bench_shape(name: str, batch: int, heads: int, s: int, d: int, block: int, keep: float, samples: int,
                pooled: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, s, 3, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    row: dict = {"shape": name, "batch": batch, "heads": heads, "tokens": s, "head_dim": d, "block": block,
                 "max_keep": keep, "samples": samples}
    with torch.no_grad():
        row["sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), graph=False, calls=5, reps=20)
        build = lambda: asa_mask(q, k, block, tau=0.95, max_keep=keep, samples=samples)  # noqa: E731
        mask = build()
        row["density"] = mask.density()
        row["mask_ms"] = time_ms(build, graph=True, calls=5, reps=20)
        row["mask_two_pass_ms"] = time_ms(lambda: asa_mask(q, k, block, tau=0.95, max_keep=keep, samples=samples, passes=2),
                                          graph=True, calls=5, reps=20)
        row["sparse_ms"] = time_ms(lambda: block_sparse_attention(q, k, v, mask), graph=True, calls=5, reps=20)
        ref = F.scaled_dot_product_attention(q, k, v)
        row["asa_ms"] = time_ms(lambda: block_sparse_attention(q, k, v, build()), graph=True, calls=5, reps=20)
        row["mask_share"] = row["mask_ms"] / row["sparse_ms"]
        row["sparse_vs_sdpa"] = row["sdpa_ms"] / row["sparse_ms"]
        row["asa_vs_sdpa"] = row["sdpa_ms"] / row["asa_ms"]
        if pooled:
            try:
                out = asa_attention(q, k, v, mask, pooled_kv=True)
                row["pooled_rel_err_vs_dense"] = float((out.float() - ref.float()).norm() / ref.float().norm())
                row["sparse_rel_err_vs_dense"] = float((block_sparse_attention(q, k, v, mask).float() - ref.float()).norm()
                                                       / ref.float().norm())
                row["asa_pooled_ms"] = time_ms(lambda: asa_attention(q, k, v, build(), pooled_kv=True), graph=True, calls=3, reps=10)
                row["pooled_ms"] = row["asa_pooled_ms"] - row["asa_ms"]
                row["asa_pooled_vs_sdpa"] = row["sdpa_ms"] / row["asa_pooled_ms"]
            except torch.OutOfMemoryError as e:
                row["pooled_error"] = f"out of memory: {e}"[:200]
    del q, k, v, qkv
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/asa_speed.json"))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--blocks", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--keep", nargs="+", type=float, default=[0.2, 0.1], help="max_keep values (kept share of blocks)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: each shape's own)")
    ap.add_argument("--no-pooled", action="store_true", help="skip the pooled-KV branch")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("asa_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from sparsedistill.runs import environment

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    rows: list[dict] = []
    for name in args.shapes:
        own_batch, heads, s, d = SHAPES[name]
        for batch in args.batch or [own_batch]:
            for block in args.blocks:
                for keep in args.keep:
                    try:
                        row = bench_shape(name, batch, heads, s, d, block, keep, args.samples, not args.no_pooled)
                    except Exception as e:  # noqa: BLE001  (report and go on)
                        row = {"shape": name, "batch": batch, "block": block, "max_keep": keep, "error": f"{type(e).__name__}: {e}"[:300]}
                    rows.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
