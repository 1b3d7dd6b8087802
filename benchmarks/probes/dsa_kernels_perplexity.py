"""Does issue 27's kernel path change DSA perplexity? (issue 27 item 4; on the CPU, under Triton's interpreter)

The same SmolLM2-135M + DSA (seeded, untrained indexers; IndexCache pattern with every 4th layer Full; sink 1,
local 16, as the recipe's presets) over the same held-out windows, run two ways in two processes:

  reference  torch.topk selections, masked SDPA over them: the path of every earlier CPU perplexity
  kernels    the prefilter top-k (attention/indexer_select.py) and the group-union attention over groups of 16
             queries (attention/topk_union.py, union built by the scatter kernels), run by Triton's interpreter
             (the model's CUDA-only dispatch to the kernels is redirected to them here)

and reports each perplexity, dense's, their ratio (the issue: within 0.5 %), and per query of the Full layers whether
the prefilter's selection equals torch.topk's from the same layer input: the same keys, or the same scores (equal up
to which of several equal-scoring keys was kept: ReLU scores of untrained indexers tie often, and each method breaks
ties its own way).
The interpreter is slow (the prefilter ~40 s a Full layer at 512 tokens), hence small contexts.

    python benchmarks/probes/dsa_kernels_perplexity.py --out benchmarks/results/dsa_kernels_perplexity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def run_path(path: str, args: argparse.Namespace) -> dict:
    """One way of running DSA (``path``), in this process: per-window losses, selections, seconds."""
    from sparsedistill.attention.indexcache import DSA, IndexPattern
    from sparsedistill.data.text import load_corpus, split_documents, token_windows
    from sparsedistill.models import llama
    from sparsedistill.models.gguf import gguf_tokenizer, load_gguf_llama

    model = load_gguf_llama(dtype=torch.float32).eval().requires_grad_(False)
    tok = gguf_tokenizer()
    windows = torch.cat([token_windows(split_documents(load_corpus(c))["test"], lambda t: tok.encode(t).ids,
                                       args.context, max_windows=args.windows, eos=2) for c in args.corpora])
    cfg = model.cfg
    torch.manual_seed(0)
    dsa = DSA(cfg.n_layers, cfg.dim, args.topk, 4, 32, IndexPattern.every(args.freq, cfg.n_layers),
              rope_dims=16, rope_theta=cfg.rope_theta, sink=1, local=16).eval()
    if path == "kernels":
        from sparsedistill.attention import TopkSelection, topk_attention, topk_attention_union

        dsa.indexer_method, dsa.union_group = "prefilter", args.group
        dsa.max_union_ratio = 1.0  # every prefill builds its union: the union kernel is what is checked

        def kernel_attention(q, k, v, indices):  # what llama._sparse_attention runs on a GPU
            if isinstance(indices, TopkSelection):
                return topk_attention_union(q, k, v, indices.indices, indices.union.group, union=indices.union,
                                            dispatch="union", check_indices=False)
            return topk_attention(q, k, v, indices, check_indices=False)

        llama._sparse_attention = kernel_attention
    from sparsedistill.attention.topk import indexer_scores_reference

    dsa.record_inputs = True
    losses, t0 = [], time.perf_counter()
    agree = {"same_keys": 0, "same_scores": 0, "queries": 0}
    with torch.no_grad():
        for i, x in enumerate(windows):
            x = x[None]
            logits = model(x, select=dsa if path != "dense" else None).float()
            losses.append(float(F.cross_entropy(logits[0, :-1], x[0, 1:])))
            if path == "dense":
                continue
            if path != "kernels":
                continue
            for layer, kern in dsa.selected.items():  # against torch.topk's selection from the same layer inputs
                if dsa.pattern.layers[layer] != "F":
                    continue
                h = dsa.inputs[layer]
                dsa.indexer_method = "topk"
                ref = dsa._select(layer, h)
                dsa.indexer_method = "prefilter"
                scores = indexer_scores_reference(*dsa.indexers[layer].project(h, 0))[0]
                held = [scores.gather(1, s[0].clamp(min=0).long()).masked_fill(s[0] < 0, 0.0).sort(-1).values
                        for s in (kern, ref)]
                agree["same_keys"] += int((kern[0].sort(-1).values == ref[0].sort(-1).values).all(-1).sum())
                agree["same_scores"] += int((held[0] == held[1]).all(-1).sum())
                agree["queries"] += kern.shape[1]
            print(f"{path}: window {i + 1}/{len(windows)} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return {"losses": losses, "agreement": agree, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--freq", type=int, default=4, help="a Full layer every FREQ layers (IndexCache 1/4)")
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--windows", type=int, default=1, help="test windows per corpus")
    ap.add_argument("--corpora", nargs="+", default=["python-docs", "shakespeare"])
    ap.add_argument("--path", choices=["dense", "reference", "kernels"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dsa_kernels_perplexity_cpu.json"))
    args = ap.parse_args()
    if args.path:
        args.child_out.write_text(json.dumps(run_path(args.path, args)))
        return 0
    from sparsedistill.runs import environment

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("dense", "reference", "kernels"):  # the interpreter is chosen per process, at import
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            if path == "kernels":
                env["TRITON_INTERPRET"] = "1"
            out = Path(tmp) / f"{path}.json"
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--path", path, "--child-out", str(out)],
                           env=env, check=True)
            results[path] = json.loads(out.read_text())
    ppl = {p: math.exp(sum(r["losses"]) / len(r["losses"])) for p, r in results.items()}
    summary = {"perplexity": ppl, "kernels_vs_reference": ppl["kernels"] / ppl["reference"],
               "selection_agreement": results["kernels"]["agreement"],
               "per_window_loss": {p: r["losses"] for p, r in results.items()},
               "seconds": {p: round(r["seconds"]) for p, r in results.items()}}
    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"environment": env, "context": args.context, "topk": args.topk, "freq": args.freq,
                                   "group": args.group, "corpora": args.corpora, "windows_per_corpus": args.windows,
                                   **summary}, indent=1))
    tmp_out.replace(args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_window_loss"}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
