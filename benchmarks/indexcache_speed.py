"""Prefill time and decode tokens/s for dense attention, DSA and DSA + IndexCache, on one GPU, side by side.

Two shapes: SmolLM2-135M (30 layers, 9 query / 3 KV heads of 64, the recipe's 4 x 32 indexer) and
a 30B-class DSA config (48 layers, width 4096, 32 query / 8 KV heads of 128, a 32 x 128 indexer,
the FFN at the width of the experts a token activates). Weights are random (speed does not
depend on them) and bf16; k = 2048 selected keys.

Layers of a model are identical, so each piece is timed once per context on one real decoder
layer and the model is their sum:

  dense       = L x layer(dense attention)
  DSA         = L x layer(top-k attention) + L x indexer(scores + top-k)
  IndexCache  = L x layer(top-k attention) + F x indexer, F = Full layers (1/2, 1/4, 1/8 of L)

Decode is one new token over a cache of S tokens, every piece captured in a CUDA graph. For the
SmolLM2 shape the whole model also runs end to end (prefill at the ``--e2e-contexts``) to check
that the sum matches what the real model does, with today's DSA kernels and with issue 27's (exact
prefilter top-k, group-union attention), each beside a profiler split (attention / indexer / rest).

    python benchmarks/indexcache_speed.py --out benchmarks/results/indexcache_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.attention.indexcache import DSA, IndexPattern, LightningIndexer  # noqa: E402
from sparsedistill.attention.topk import indexer_topk  # noqa: E402
from sparsedistill.models.llama import KVCache, Layer, Llama, LlamaConfig, rope_tables  # noqa: E402
from sparsedistill.timing import kernel_times, time_ms  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(model=LlamaConfig(), indexer_heads=4, indexer_dim=32),
    "30b-class": dict(model=LlamaConfig(vocab_size=151552, dim=4096, n_layers=48, n_heads=32, n_kv_heads=8, ffn_dim=6144),
                      indexer_heads=32, indexer_dim=128),
}
KEEP = (1.0, 0.5, 0.25, 0.125)  # share of layers that run their own indexer (1.0 = plain DSA)


def _prefill_pieces(cfg: LlamaConfig, hi: int, di: int, s: int, topk: int, score_dtype: torch.dtype) -> dict:
    dev, dt = "cuda", torch.bfloat16
    layer = Layer(cfg).to(dev, dt).eval()
    ix = LightningIndexer(cfg.dim, hi, di).to(dev, dt).eval()
    g = torch.Generator(device=dev).manual_seed(s)
    x = torch.randn(1, s, cfg.dim, device=dev, dtype=dt, generator=g)
    cos, sin = rope_tables(cfg, torch.arange(s, device=dev))
    out: dict = {}
    with torch.no_grad():
        idx = indexer_topk(*ix.project(x), topk, score_dtype=score_dtype)
        reps = 3 if s >= 65536 else 5
        out["layer_dense_ms"] = time_ms(lambda: layer(x, cos, sin), graph=False, calls=1, reps=reps)
        out["layer_topk_ms"] = time_ms(lambda: layer(x, cos, sin, select=lambda i, h: idx), graph=False, calls=1, reps=reps)
        out["indexer_ms"] = time_ms(lambda: indexer_topk(*ix.project(x), topk, score_dtype=score_dtype), graph=False,
                                    calls=1, reps=reps)
    del layer, ix, x, idx
    torch.cuda.empty_cache()
    return out


def _decode_pieces(cfg: LlamaConfig, hi: int, di: int, s: int, topk: int, score_dtype: torch.dtype) -> dict:
    """One new token after ``s`` cached ones; each piece captured in a CUDA graph (as a serving engine runs decode)."""
    dev, dt = "cuda", torch.bfloat16
    one = dataclasses.replace(cfg, n_layers=1, max_seq_len=s + 1)
    layer = Layer(one).to(dev, dt).eval()
    ix = LightningIndexer(cfg.dim, hi, di).to(dev, dt).eval()
    g = torch.Generator(device=dev).manual_seed(s + 1)
    cache = KVCache.empty(one, 1, s + 1, dev, dt)
    for t in (cache.k[0], cache.v[0]):
        t.normal_(generator=g)
    cache.length = s  # Layer does not advance it: every timed call writes position s and reads s + 1 keys
    keys = torch.randn(1, s + 1, di, device=dev, dtype=dt, generator=g)
    x = torch.randn(1, 1, cfg.dim, device=dev, dtype=dt, generator=g)
    cos, sin = rope_tables(cfg, torch.tensor([s], device=dev))
    idx = torch.randperm(s + 1, device=dev, generator=g)[:topk].to(torch.int32).view(1, 1, topk)

    def indexer_step():
        q, w, k = ix.project(x)
        keys[:, s:] = k
        return indexer_topk(q, w, keys, topk, kv_len=s + 1, score_dtype=score_dtype)

    out: dict = {}
    with torch.no_grad():
        out["layer_dense_decode_ms"] = time_ms(lambda: layer(x, cos, sin, cache, 0), graph=True, calls=20, reps=20)
        out["layer_topk_decode_ms"] = time_ms(lambda: layer(x, cos, sin, cache, 0, select=lambda i, h: idx), graph=True,
                                              calls=20, reps=20)
        out["indexer_decode_ms"] = time_ms(indexer_step, graph=True, calls=20, reps=20)
    del layer, ix, cache, keys
    torch.cuda.empty_cache()
    return out


def _compose(n_layers: int, p: dict, prefix: str) -> dict:
    suffix = "_decode_ms" if prefix == "decode" else "_ms"
    dense = n_layers * p[f"layer_dense{suffix}"]
    rows = {"dense_ms": dense}
    for keep in KEEP:
        full = max(1, round(n_layers * keep))
        t = n_layers * p[f"layer_topk{suffix}"] + full * p[f"indexer{suffix}"]
        name = "dsa" if keep == 1.0 else f"indexcache_{full}of{n_layers}"
        rows[f"{name}_ms"] = t
        rows[f"{name}_indexer_share"] = full * p[f"indexer{suffix}"] / t
        rows[f"{name}_vs_dense"] = dense / t
    for key in list(rows):
        if key.startswith("indexcache") and key.endswith("_ms"):
            rows[key.replace("_ms", "_vs_dsa")] = rows["dsa_ms"] / rows[key]
    if prefix == "decode":
        rows = {**rows, **{k.replace("_ms", "_tokens_per_s"): 1000 / v for k, v in rows.items() if k.endswith("_ms")}}
    return rows


def split(fn) -> dict[str, float]:
    """GPU ms of one call by kind: attention (SDPA / top-k / union kernels), indexer (scores and top-k kernels), the
    rest (also the indexer's projections and the union's build, which run as generic kernels)."""
    try:
        kernels = kernel_times(fn)
    except Exception as e:  # noqa: BLE001  (a profiler failure costs the split, not the row)
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    out = {"attention_ms": 0.0, "indexer_ms": 0.0, "rest_ms": 0.0}
    for name, ms in kernels.items():
        n = name.lower()
        if any(a in n for a in ("flash", "fmha", "attn_kernel", "attention", "sdpa", "cudnn")):
            out["attention_ms"] += ms
        elif any(a in n for a in ("indexer", "group_keys", "threshold", "candidates", "exact_select", "topk", "sort",
                                   "radix")):
            out["indexer_ms"] += ms
        else:
            out["rest_ms"] += ms
    return {k: round(v, 3) for k, v in out.items()}


def end_to_end(s: int, topk: int, score_dtype: torch.dtype, kernels: list[str]) -> dict:
    """The whole SmolLM2-shaped model: prefill of ``s`` tokens, dense vs DSA vs IndexCache (1/4 of the indexers),
    with today's kernels (``today``: chunked torch.topk, per-token attention) and issue 27's (``new``: the exact
    prefilter top-k in fp32, the group-union attention over 16 queries, unions built once per Full layer)."""
    cfg = dataclasses.replace(LlamaConfig(), max_seq_len=s)
    torch.manual_seed(0)
    model = Llama(cfg).cuda().to(torch.bfloat16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, s), device="cuda")
    out = {}
    with torch.no_grad():
        dense = lambda: model(tokens, last_only=True)  # noqa: E731
        out["dense_ms"] = time_ms(dense, graph=False, calls=1, reps=3)
        out["dense_split"] = split(dense)
        for name, pattern in (("dsa", IndexPattern.full(cfg.n_layers)), ("indexcache_8of30", IndexPattern.every(4, cfg.n_layers))):
            spec = SHAPES["smollm2-135m"]
            for kind in kernels:
                key = name if kind == "today" else f"{name}_{kind}"
                try:
                    dsa = DSA(cfg.n_layers, cfg.dim, topk, spec["indexer_heads"], spec["indexer_dim"], pattern).cuda().to(torch.bfloat16).eval()
                    dsa.score_dtype = score_dtype
                    if kind == "new":
                        dsa.score_dtype, dsa.indexer_method, dsa.union_group = torch.float32, "prefilter", 16
                    run = lambda: model(tokens, select=dsa, last_only=True)  # noqa: E731
                    out[f"{key}_ms"] = time_ms(run, graph=False, calls=1, reps=3)
                    out[f"{key}_vs_dense"] = out["dense_ms"] / out[f"{key}_ms"]
                    out[f"{key}_split"] = split(run)
                    if kind == "new":  # the union kernel runs only while u <= 8 (dispatch "auto"), else per token
                        from sparsedistill.attention import union_ratio

                        out[f"{key}_union_ratio"] = union_ratio(dsa.selected[0], dsa.union_group)
                except Exception as e:  # noqa: BLE001  (record, go on with the next variant)
                    out[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/indexcache_speed.json"))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 65536, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--score-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="precision of the indexer scores the top-k reads")
    ap.add_argument("--e2e-contexts", nargs="*", type=int, default=[8192, 32768],
                    help="contexts at which the whole SmolLM2-shaped model also runs end to end")
    ap.add_argument("--e2e-kernels", nargs="+", default=["today", "new"], choices=["today", "new"],
                    help="DSA's kernels in the end-to-end rows: today's (torch.topk, per-token attention) and/or "
                         "issue 27's (prefilter top-k, group-union attention)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("indexcache_speed.py needs a CUDA GPU; none was found.", file=sys.stderr)
        return 2
    from sparsedistill.runs import environment

    import triton

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    score_dtype = getattr(torch, args.score_dtype)
    results: dict = {"environment": env, "topk": args.topk, "score_dtype": args.score_dtype, "shapes": {}, "end_to_end": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    for name in args.shapes:
        spec = SHAPES[name]
        cfg, hi, di = spec["model"], spec["indexer_heads"], spec["indexer_dim"]
        rows = []
        results["shapes"][name] = {"config": dataclasses.asdict(cfg), "indexer_heads": hi, "indexer_dim": di, "contexts": rows}
        for s in args.contexts:
            row = {"context": s}
            try:
                row["pieces_prefill"] = _prefill_pieces(cfg, hi, di, s, args.topk, score_dtype)
                row["prefill"] = _compose(cfg.n_layers, row["pieces_prefill"], "prefill")
                row["pieces_decode"] = _decode_pieces(cfg, hi, di, s, args.topk, score_dtype)
                row["decode"] = _compose(cfg.n_layers, row["pieces_decode"], "decode")
            except Exception as e:  # noqa: BLE001  (record, go on with the next size)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
            print(name, json.dumps(row), flush=True)
            rows.append(row)
            save()
    if "smollm2-135m" in args.shapes:
        for s in args.e2e_contexts:
            try:
                r = {"context": s, **end_to_end(s, args.topk, score_dtype, args.e2e_kernels)}
            except Exception as e:  # noqa: BLE001
                r = {"context": s, "error": f"{type(e).__name__}: {e}"[:300]}
            print("end to end", json.dumps(r), flush=True)
            results["end_to_end"].append(r)
            save()
    print(f"\n{'shape':<14}{'context':>8}  {'prefill ms dense / DSA / IC 1/4':>34}  {'IC1/4 vs DSA':>12}  "
          f"{'decode tok/s dense / DSA / IC 1/4':>36}  {'IC1/4 vs DSA':>12}")
    for name, r in results["shapes"].items():
        n = r["config"]["n_layers"]
        ic = f"indexcache_{max(1, round(n * 0.25))}of{n}"
        for row in r["contexts"]:
            if "error" in row:
                print(f"{name:<14}{row['context']:>8}  {row['error'][:80]}")
                continue
            p, d = row["prefill"], row["decode"]
            print(f"{name:<14}{row['context']:>8}  {p['dense_ms']:>10.1f} / {p['dsa_ms']:>8.1f} / {p[ic + '_ms']:>8.1f}  "
                  f"{p[ic + '_vs_dsa']:>11.2f}x  {d['dense_tokens_per_s']:>10.0f} / {d['dsa_tokens_per_s']:>8.0f} / "
                  f"{d[ic + '_tokens_per_s']:>8.0f}  {d[ic + '_vs_dsa']:>11.2f}x")
    for r in results["end_to_end"]:  # whole-model prefill, ms (x dense)
        rows = [f"{k[:-3]} {v:.1f}" + (f" ({r[k[:-3] + '_vs_dense']:.2f}x)" if k[:-3] + "_vs_dense" in r else "")
                for k, v in r.items() if k.endswith("_ms")]
        print(f"end to end, {r['context']} tokens: " + "; ".join(rows) +
              "".join(f"; {k}: {v[:60]}" for k, v in r.items() if k.endswith("error")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
