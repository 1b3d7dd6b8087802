"""DSA prefill kernels (issue 27) on one GPU, ours against what runs today and against dense attention.

Indexer + top-k per context and indexer shape (SmolLM2's 4 heads x 32, and 16 x 64 as a stress case), k = 2048:
today's chunked ``torch.topk`` over fp32 and bf16 scores against the exact group-max prefilter
(``method="prefilter"``), its exactness against a stable sort of the kernel's own fp32 scores where the
scores fit (<= 16K), its fallback rows and candidate counts, and a profiler split by kernel.

Top-k attention prefill (H = 16, Hkv = 4, D = 128, bf16): dense causal SDPA (flash), today's per-token
``topk_attention`` and the group-union kernel (``topk_attention_union``, dispatch forced) at groups of 16
and 32, for selections of three kinds, each with its union ratio u = |union| / k:
``indexer`` (the indexer's own top-k on random inputs: the worst case, u near the group size), ``local``
(each query's k most recent keys: u near 1), ``half_local`` (k/2 most recent plus k/2 random) and ``pooled``
(each group of 16 queries picks its k keys from one shared pool of 2.5 k: u near 2.5, what the top-k of real
attention gave on SmolLM2-135M, ``benchmarks/probes/dsa_selection_overlap.py``).
A trained student's selections lie somewhere between; the issue's 15 ms needs them measured.

    python benchmarks/dsa_kernels_speed.py --contexts 32768 131072 --out benchmarks/results/dsa_kernels_speed.json
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
from sparsedistill.attention.indexer_select import indexer_topk_prefilter, select_topk_sorted  # noqa: E402
from sparsedistill.attention.topk import indexer_scores, indexer_topk, topk_attention  # noqa: E402
from sparsedistill.attention.topk_union import group_union, topk_attention_union, union_ratio  # noqa: E402
from sparsedistill.timing import kernel_times, top_kernels, time_ms  # noqa: E402

INDEXER_SHAPES = {"smollm2": (4, 32), "stress": (16, 64)}


def timed(fn, reps: int) -> float:
    return time_ms(fn, graph=False, calls=1, reps=reps)


def split(fn) -> dict:
    """Kernel name -> ms of one call, largest first (names shortened); a profiler failure is recorded, not raised,
    so the row's timings stay."""
    try:
        times = kernel_times(fn)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    return top_kernels(times)


def bench_indexer(s: int, topk: int, hi: int, di: int, reps: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, s, hi, di, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.rand(1, s, hi, device="cuda", generator=g) / hi
    k = torch.randn(1, s, di, device="cuda", dtype=torch.bfloat16, generator=g)
    row: dict = {"context": s, "topk": topk, "indexer_heads": hi, "indexer_dim": di}
    stats: dict = {}
    picked = indexer_topk_prefilter(q, w, k, topk, stats=stats)
    row["prefilter_stats"] = stats
    if s <= 16384:  # the exactness rule on the kernel's own fp32 scores (the full matrix fits)
        scores = indexer_scores(q, w, k)
        want = select_topk_sorted(scores, torch.arange(1, s + 1, device="cuda")[None], topk)
        row["prefilter_exact"] = bool(torch.equal(picked, want))
        del scores, want
    del picked
    row["topk_fp32_ms"] = timed(lambda: indexer_topk(q, w, k, topk), reps)
    row["topk_bf16_ms"] = timed(lambda: indexer_topk(q, w, k, topk, score_dtype=torch.bfloat16), reps)
    row["prefilter_ms"] = timed(lambda: indexer_topk(q, w, k, topk, method="prefilter"), reps)
    row["prefilter_vs_topk_bf16"] = row["topk_bf16_ms"] / row["prefilter_ms"]
    row["split_topk_bf16"] = split(lambda: indexer_topk(q, w, k, topk, score_dtype=torch.bfloat16))
    row["split_prefilter"] = split(lambda: indexer_topk(q, w, k, topk, method="prefilter"))
    return row


def selections(kind: str, s: int, topk: int) -> torch.Tensor:
    """(1, S, k) int32 causal selections of one kind, ascending, -1 where fewer keys are visible."""
    g = torch.Generator(device="cuda").manual_seed(1)
    pos = torch.arange(s, device="cuda")[:, None]
    if kind == "indexer":
        q = torch.randn(1, s, 4, 32, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.rand(1, s, 4, device="cuda", generator=g) / 4
        k = torch.randn(1, s, 32, device="cuda", dtype=torch.bfloat16, generator=g)
        return indexer_topk(q, w, k, topk)  # today's top-k: a cut prefilter run still times the attention
    if kind == "pooled":  # each group of 16 queries picks its k keys from one pool of 2.5 k keys they all see
        group, size = 16, round(2.5 * topk)
        first = torch.arange(0, s, group, device="cuda")[:, None]  # a group's first query sees keys 0..first
        pool = (torch.rand(len(first), size, device="cuda", generator=g) * (first + 1)).long()
        pick = torch.rand(s, size, device="cuda", generator=g).topk(topk, 1).indices
        idx = pool.repeat_interleave(group, 0)[:s].gather(1, pick)
        return _ascending_distinct(idx, s)
    local = topk if kind == "local" else topk // 2
    recent = pos - torch.arange(local, device="cuda")[None]  # the last `local` positions
    parts = [recent]
    if kind == "half_local":  # plus random earlier keys (duplicates of recent ones are dropped below)
        parts.append((torch.rand(s, topk - local, device="cuda", generator=g) * (pos + 1)).long())
    return _ascending_distinct(torch.cat(parts, 1), s)


def _ascending_distinct(idx: torch.Tensor, s: int) -> torch.Tensor:
    """(S, n) keys, maybe repeated or negative -> (1, S, n) int32 ascending distinct keys, -1 padded at the end."""
    idx = torch.where(idx >= 0, idx, -1).sort(1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    idx = torch.where(dup | (idx < 0), s, idx).sort(1).values  # padding and duplicates last
    return torch.where(idx == s, -1, idx).to(torch.int32)[None]


def bench_attention(s: int, topk: int, reps: int, kinds: list[str], groups: list[int], done) -> None:
    """One row per selection kind, each handed to ``done`` (saved) as soon as it is finished."""
    h, hkv, d = 16, 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps)
    for kind in kinds:
        idx = selections(kind, s, topk)
        row: dict = {"context": s, "topk": topk, "H": h, "Hkv": hkv, "D": d, "selection": kind, "sdpa_causal_ms": sdpa_ms}
        per_token = lambda: topk_attention(q, k, v, idx, check_indices=False)  # noqa: E731
        row["per_token_ms"] = timed(per_token, reps)
        ref = per_token()
        for group in groups:
            u = union_ratio(idx, group)
            union = group_union(idx, group)
            run = lambda: topk_attention_union(q, k, v, idx, group, union=union, dispatch="union",  # noqa: E731
                                               check_indices=False)
            err = float((run().float() - ref.float()).abs().max())
            sort = group_union(idx, group, method="sort")
            same = all(torch.equal(a, b) for a, b in zip(sort[:3], group_union(idx, group, method="scatter")[:3]))
            row[f"g{group}"] = {"union_ratio": u, "union_ms": timed(run, reps), "max_err_vs_per_token": err,
                                # the union's build, by one sort per group (PyTorch) and by the scatter kernels
                                "build_union_ms": timed(lambda: group_union(idx, group, method="sort"), reps),
                                "build_union_scatter_ms": timed(lambda: group_union(idx, group, method="scatter"), reps),
                                "scatter_equals_sort": same}
            del sort
            row[f"g{group}"]["speedup_vs_per_token"] = row["per_token_ms"] / row[f"g{group}"]["union_ms"]
            row[f"g{group}"]["split"] = split(run)
        row["split_per_token"] = split(per_token)
        done(row)
        print("attention", json.dumps({k_: v_ for k_, v_ in row.items() if not k_.startswith("split")}), flush=True)
        del idx
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dsa_kernels_speed.json"))
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--indexer-shapes", nargs="*", default=list(INDEXER_SHAPES), choices=list(INDEXER_SHAPES))
    ap.add_argument("--selections", nargs="*", default=["indexer", "pooled", "local", "half_local"],
                    choices=["indexer", "pooled", "local", "half_local"])
    ap.add_argument("--groups", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("dsa_kernels_speed.py needs a CUDA GPU; none was found.", file=sys.stderr)
        return 2
    import triton

    from sparsedistill.runs import environment

    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "timing": f"median of {args.reps} calls (CUDA events)"}
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    results: dict = {"environment": env, "indexer": [], "attention": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)  # a cut run leaves the rows it finished

    for s in args.contexts:
        for name in args.indexer_shapes:
            hi, di = INDEXER_SHAPES[name]
            try:
                row = {"shape": name, **bench_indexer(s, args.topk, hi, di, args.reps)}
            except Exception as e:  # noqa: BLE001  (record, go on with the next size)
                row = {"shape": name, "context": s, "error": f"{type(e).__name__}: {e}"[:300]}
            print("indexer", json.dumps({k: v for k, v in row.items() if not k.startswith("split")}), flush=True)
            results["indexer"].append(row)
            save()
            torch.cuda.empty_cache()
        def done(row: dict) -> None:
            results["attention"].append(row)
            save()

        try:
            bench_attention(s, args.topk, args.reps, args.selections, args.groups, done)
        except Exception as e:  # noqa: BLE001  (the rows finished before it are saved)
            done({"context": s, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()
    print(f"\n{'context':>8} {'indexer':>8} {'topk fp32':>10} {'topk bf16':>10} {'prefilter':>10} {'fallback':>9}")
    for r in results["indexer"]:
        if "error" in r:
            print(f"{r['context']:>8} {r['shape']:>8} {r['error'][:70]}")
            continue
        print(f"{r['context']:>8} {r['shape']:>8} {r['topk_fp32_ms']:>10.2f} {r['topk_bf16_ms']:>10.2f} "
              f"{r['prefilter_ms']:>10.2f} {r['prefilter_stats'].get('fallback_rows', 0):>9}")
    print(f"\n{'context':>8} {'selection':>10} {'sdpa':>8} {'per-token':>10} " +
          " ".join(f"{'g' + str(g) + ' u / ms':>16}" for g in args.groups))
    for r in results["attention"]:
        if "error" in r:
            print(f"{r['context']:>8} {r['error'][:80]}")
            continue
        print(f"{r['context']:>8} {r['selection']:>10} {r['sdpa_causal_ms']:>8.2f} {r['per_token_ms']:>10.2f} " +
              " ".join(f"{r[f'g{g}']['union_ratio']:>7.2f} / {r[f'g{g}']['union_ms']:>6.2f}" for g in args.groups))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
