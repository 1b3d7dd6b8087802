"""How much do neighbouring queries' top-k selections overlap on a real model? (issue 27, design notes section 7)

The group-union attention kernel pays only while a group of G consecutive queries selects few distinct keys
(u = |union| / k well below G); with the benchmark's selections (an indexer on random inputs) u was 10.6 of 16.
This probe measures u for selections with real structure: per query, the k keys of highest dense attention
probability summed over the heads (the "oracle" a trained DSA indexer is distilled toward), on SmolLM2-135M over
held-out text (python-docs and Shakespeare test splits), every layer, on the CPU. Beside it, u of k uniformly
random visible keys a query (the benchmark's kind) and of the k most recent keys (u near 1). Only queries that see
more than k keys count (the first k, which see fewer, would lower every u).

    python benchmarks/probes/dsa_selection_overlap.py --context 4096 --topk 256 512 --out benchmarks/results/dsa_selection_overlap_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.attention.indexcache import dense_attention_probs, layer_inputs, topk_from_scores  # noqa: E402
from sparsedistill.attention.topk_union import union_ratio  # noqa: E402
from sparsedistill.data.text import load_corpus, split_documents, token_windows  # noqa: E402
from sparsedistill.models.gguf import gguf_tokenizer, load_gguf_llama  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402


def random_visible(s: int, topk: int, seed: int = 0) -> torch.Tensor:
    """(1, s, topk) distinct random visible keys a query (all of them where fewer are visible), -1 padded."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(s, s, generator=g).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return topk_from_scores(scores[None], topk)


def recent(s: int, topk: int) -> torch.Tensor:
    t = torch.arange(s)[:, None] - torch.arange(topk)[None, :]
    return torch.where(t >= 0, t, -1).to(torch.int32)[None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--topk", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--corpora", nargs="+", default=["python-docs", "shakespeare"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dsa_selection_overlap_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_gguf_llama(dtype=torch.float32).eval().requires_grad_(False)
    tok = gguf_tokenizer()
    rows: list[dict] = []
    t0 = time.perf_counter()
    for corpus in args.corpora:
        test = split_documents(load_corpus(corpus))["test"]
        tokens = token_windows(test, lambda t: tok.encode(t).ids, args.context, max_windows=1, eos=2)
        hidden = ~torch.ones(args.context, args.context, dtype=torch.bool).tril()  # by position, not by a zero probability
        with torch.no_grad():
            inputs = layer_inputs(model, tokens)
            for layer, h in sorted(inputs.items()):
                probs = dense_attention_probs(model, layer, h).sum(1)  # (1, S, S): one selection shared by the heads
                for k in args.topk:
                    oracle = topk_from_scores(probs.masked_fill(hidden, float("-inf")), k)
                    rows.append({"corpus": corpus, "layer": layer, "topk": k,
                                 "u_oracle": union_ratio(oracle[:, k:], args.group)})
                del probs
        print(f"{corpus}: {len(inputs)} layers, {time.perf_counter() - t0:.0f} s", flush=True)
    s = args.context
    baselines = {k: {"u_random": union_ratio(random_visible(s, k)[:, k:], args.group),
                     "u_recent": union_ratio(recent(s, k)[:, k:], args.group)} for k in args.topk}
    summary = {}
    for k in args.topk:
        us = [r["u_oracle"] for r in rows if r["topk"] == k]
        summary[str(k)] = {"u_oracle_mean": statistics.mean(us), "u_oracle_min": min(us), "u_oracle_max": max(us),
                           "layers_u_below_half_group": sum(u <= 0.5 * args.group for u in us), "layers": len(us),
                           **baselines[k]}
        print(f"k = {k}: oracle u mean {summary[str(k)]['u_oracle_mean']:.2f} (min {min(us):.2f}, max {max(us):.2f}); "
              f"random {baselines[k]['u_random']:.2f}, recent {baselines[k]['u_recent']:.2f}; group {args.group}")
    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "context": s, "group": args.group, "summary": summary,
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
