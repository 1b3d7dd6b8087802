"""Block-sparse attention speed on one GPU: dense SDPA vs FlexAttention (compiled, same block mask) vs ours.

For each head dim, sequence length and kept-block density: forward and forward+backward times,
mask-building time separately (FlexAttention's ``create_block_mask`` vs our ``BlockMask``), and
ASA end to end (pooling + selection + attention). B = 1, H = 12 (D = 64) or 16 (D = 128), bf16,
random block masks with the diagonal kept, every output checked against SDPA with the same mask.
With ``--topk``: DSA prefill and single-token decode at 8K-128K context, k = 512 and 2048, the
indexer's time separately, against dense SDPA.

    python benchmarks/attention_speed.py --out benchmarks/results/attention_speed.json
    python benchmarks/attention_speed.py --topk --seqs 8192 32768 65536 131072 --out benchmarks/results/topk_attention_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.attention import BlockMask, asa_mask, block_sparse_attention  # noqa: E402
from sparsedistill.attention.block_sparse import tuned_configs  # noqa: E402
from sparsedistill.timing import time_ms  # noqa: E402


def timed(fn, calls: int = 5, reps: int = 10) -> float:
    return time_ms(fn, graph=False, calls=calls, reps=reps)


def fwd_bwd(fn, q, k, v, do):
    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    return run


def bench(d: int, s: int, densities: list[float], block: int, causal: bool, flex_ok: bool) -> list[dict]:
    h = 12 if d == 64 else 16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True) for _ in range(3))
    do = torch.randn_like(q)
    n = -(-s // block)
    rows = []
    dense_fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    dense_fb = timed(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), q, k, v, do), calls=2, reps=5)
    if flex_ok:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    # With causal, density counts the blocks a causal mask can keep at all, so 100 % is SDPA's causal work.
    visible = BlockMask.from_block_bool(torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None], block, s).density() if causal else 1.0
    for dens in densities:
        keep = torch.rand(1, h, n, n, device="cuda", generator=g) < dens
        keep |= torch.eye(n, dtype=torch.bool, device="cuda")
        if causal:
            keep &= torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
        row = {"D": d, "S": s, "H": h, "block": block, "causal": causal, "density_target": dens,
               "sdpa_fwd_ms": dense_fwd, "sdpa_fwd_bwd_ms": dense_fb}
        t0 = time.perf_counter()
        mask = BlockMask.from_block_bool(keep, block, s)
        torch.cuda.synchronize()
        row["ours_mask_ms"] = (time.perf_counter() - t0) * 1e3
        row["ours_mask_ms_again"] = timed(lambda: BlockMask.from_block_bool(keep, block, s), calls=1, reps=5)
        row["density"] = mask.density()
        ours = lambda a, b, c: block_sparse_attention(a, b, c, mask, causal=causal)  # noqa: E731
        with torch.no_grad():
            out = ours(q, k, v).float()
            if s <= 16384:  # the dense check needs S^2 memory
                dense_mask = mask.to_dense()[0]
                if causal:
                    dense_mask &= torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask[None]).float()
                row["ours_max_err_vs_sdpa"] = float((out - ref).abs().max())
                del dense_mask, ref
        row["ours_fwd_ms"] = timed(lambda: ours(q, k, v))
        row["ours_fwd_bwd_ms"] = timed(fwd_bwd(ours, q, k, v, do), calls=2, reps=5)
        row["ours_configs_bm_bn_warps_stages"] = {kind: cfg for (kind, *case), cfg in tuned_configs().items()
                                                  if case == [block, d, causal, q.dtype]}
        if flex_ok:
            try:
                def mask_mod(b, hh, qi, ki):
                    ok = keep[b, hh, qi // block, ki // block]
                    return ok & (ki <= qi) if causal else ok
                t0 = time.perf_counter()
                # _compile: otherwise Flex materialises the S x S mask (128 GiB at 32K)
                bm = create_block_mask(mask_mod, 1, h, s, s, device="cuda", BLOCK_SIZE=block, _compile=True)
                torch.cuda.synchronize()
                row["flex_mask_ms"] = (time.perf_counter() - t0) * 1e3
                # Flex's default tiles (128) must divide the mask's block: below 128 the forward gets tiles of the
                # block's size. Its backward ignores such overrides when it filters its one default config
                # (pytorch#176025), so there it compiles under max-autotune, whose candidates include valid tiles.
                opts = None if block >= 128 else {"fwd_BLOCK_M": block, "fwd_BLOCK_N": block}
                row["flex_kernel_options"] = opts
                fl = lambda a, b, c: flex(a, b, c, block_mask=bm, kernel_options=opts)  # noqa: E731
                with torch.no_grad():
                    row["flex_max_err_vs_ours"] = float((fl(q, k, v).float() - out).abs().max())
                row["flex_fwd_ms"] = timed(lambda: fl(q, k, v))
            except Exception as e:  # noqa: BLE001  (report and go on)
                row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
            if "flex_fwd_ms" in row:  # the backward compiles separately and may fail where the forward ran
                try:
                    with inductor_config.patch(max_autotune=block < 128):
                        row["flex_fwd_bwd_ms"] = timed(fwd_bwd(fl, q, k, v, do), calls=2, reps=5)
                    row["flex_bwd_max_autotune"] = block < 128
                except Exception as e:  # noqa: BLE001
                    row["flex_bwd_error"] = f"{type(e).__name__}: {e}"[:300]
        d_ = row["density_of_visible"] = row["density"] / visible
        row["target_fwd_ms"] = 1.2 * d_ * dense_fwd
        row["ours_vs_sdpa_fwd"] = dense_fwd / row["ours_fwd_ms"]
        if "flex_fwd_ms" in row:
            row["ours_vs_flex_fwd"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
        if "flex_fwd_bwd_ms" in row:
            row["ours_vs_flex_fwd_bwd"] = row["flex_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
        print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        rows.append(row)
    # ASA end to end: pooling + selection + attention, at tau 0.9 with a 20% cap
    t_mask = timed(lambda: asa_mask(q, k, block, tau=0.9, max_keep=0.2, causal=causal), calls=1, reps=5)
    m = asa_mask(q, k, block, tau=0.9, max_keep=0.2, causal=causal)
    t_attn = timed(lambda: block_sparse_attention(q, k, v, m, causal=causal))
    rows.append({"D": d, "S": s, "H": h, "block": block, "causal": causal, "asa": True, "density": m.density(),
                 "asa_mask_ms": t_mask, "asa_attention_ms": t_attn, "asa_total_ms": t_mask + t_attn, "sdpa_fwd_ms": dense_fwd,
                 "asa_vs_sdpa": dense_fwd / (t_mask + t_attn)})
    print(rows[-1], flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()
    return rows


def bench_topk(s: int, topk: int, h: int = 16, hkv: int = 4, d: int = 128, hi: int = 16, di: int = 64) -> dict:
    """Top-k attention at context ``s``: prefill (all s queries) and one decode step, against dense SDPA.

    Dense is the faster of SDPA with GQA (``enable_gqa``) and SDPA on keys expanded to every query
    head. Decode steps are captured in CUDA graphs, as a serving engine runs them.
    """
    from sparsedistill.attention import indexer_topk, topk_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = rnd(1, h, s, d), rnd(1, hkv, s, d), rnd(1, hkv, s, d)
    qi, w, ki = rnd(1, s, hi, di), rnd(1, s, hi).abs(), rnd(1, s, di)
    row = {"S": s, "topk": topk, "H": h, "Hkv": hkv, "D": d, "indexer_heads": hi, "indexer_dim": di, "indexer_scores": "bf16"}
    kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    row["sdpa_gqa_prefill_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), calls=1, reps=3)
    row["sdpa_expanded_prefill_ms"] = timed(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), calls=1, reps=3)
    row["sdpa_prefill_ms"] = min(row["sdpa_gqa_prefill_ms"], row["sdpa_expanded_prefill_ms"])
    row["indexer_prefill_ms"] = timed(lambda: indexer_topk(qi, w, ki, topk, score_dtype=torch.bfloat16), calls=1, reps=3)
    idx = indexer_topk(qi, w, ki, topk, score_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q[:, :, -64:], kr, vr, attn_mask=_index_mask(idx[:, -64:], s)[:, None])
        row["topk_max_err_vs_sdpa"] = float((topk_attention(q, k, v, idx)[:, :, -64:].float() - ref.float()).abs().max())
    row["topk_attention_prefill_ms"] = timed(lambda: topk_attention(q, k, v, idx, check_indices=False), calls=1, reps=3)
    row["dsa_prefill_ms"] = row["indexer_prefill_ms"] + row["topk_attention_prefill_ms"]
    row["prefill_speedup"] = row["sdpa_prefill_ms"] / row["dsa_prefill_ms"]
    row["prefill_attention_speedup"] = row["sdpa_prefill_ms"] / row["topk_attention_prefill_ms"]
    del idx
    # decode: the last query over the whole cache
    q1, qi1, w1 = q[:, :, -1:], qi[:, -1:], w[:, -1:]
    graphed = lambda fn: time_ms(fn, graph=True, calls=20, reps=20)  # noqa: E731
    row["sdpa_gqa_decode_ms"] = graphed(lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True))
    row["sdpa_expanded_decode_ms"] = graphed(lambda: F.scaled_dot_product_attention(q1, kr, vr))
    row["sdpa_decode_ms"] = min(row["sdpa_gqa_decode_ms"], row["sdpa_expanded_decode_ms"])
    row["indexer_decode_ms"] = graphed(lambda: indexer_topk(qi1, w1, ki, topk, score_dtype=torch.bfloat16))
    idx1 = indexer_topk(qi1, w1, ki, topk)
    with torch.no_grad():
        ref1 = F.scaled_dot_product_attention(q1, kr, vr, attn_mask=_index_mask(idx1, s)[:, None])
        row["topk_decode_max_err_vs_sdpa"] = float((topk_attention(q1, k, v, idx1).float() - ref1.float()).abs().max())
    row["topk_attention_decode_ms"] = graphed(lambda: topk_attention(q1, k, v, idx1, check_indices=False))
    row["dsa_decode_ms"] = row["indexer_decode_ms"] + row["topk_attention_decode_ms"]
    row["decode_attention_speedup"] = row["sdpa_decode_ms"] / row["topk_attention_decode_ms"]
    row["decode_speedup_with_indexer"] = row["sdpa_decode_ms"] / row["dsa_decode_ms"]
    print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    del q, k, v, kr, vr, qi, w, ki
    torch.cuda.empty_cache()
    return row


def _index_mask(idx: torch.Tensor, s: int) -> torch.Tensor:
    """(B, Sq, S) bool: True at each query's selected keys (for checking against SDPA with that mask)."""
    keep = torch.zeros(*idx.shape[:2], s + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, torch.where(idx >= 0, idx, s).long(), True)
    return keep[..., :s]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_speed.json"))
    ap.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--seqs", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    ap.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.2, 0.1, 0.05])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--topk", action="store_true", help="the top-k (DSA) table instead: prefill and decode (try --seqs 8192 32768 65536 131072)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_speed.py needs a CUDA GPU; none was found.", file=sys.stderr)
        return 2
    from sparsedistill.runs import environment

    import triton

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: list[dict] = []
    if args.topk:
        for s in args.seqs:
            for k in (512, 2048):
                try:
                    results.append(bench_topk(s, k))
                except Exception as e:  # noqa: BLE001  (record, go on)
                    results.append({"S": s, "topk": k, "error": f"{type(e).__name__}: {e}"[:300]})
                    torch.cuda.empty_cache()
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))
        return 0
    for d in args.dims:
        for s in args.seqs:
            results += bench(d, s, args.densities, args.block, args.causal, not args.no_flex)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
