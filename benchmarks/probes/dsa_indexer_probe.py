"""Why DSA's lightning indexers select badly on SmolLM2-135M: a CPU-sized probe of indexer variants.

Issue 5's first H200 run (`indexcache run --config full`: k = 256 of a 2,048-token training
context) gave DSA / dense perplexity 1.24 at 2K, 2.11 at 4K, 14.4 at 8K. This probe trains the
same indexers with the recipe's own pieces (``load_gguf_llama``, the corpora split,
``token_windows``, ``DSA``, ``indexer_loss``, ``distill.train``) at a CPU scale with the same
k / context ratio (k = 64 of 512 by default), fp32, and measures for every eval length:

  ratio    DSA perplexity / dense perplexity on a fixed number of test tokens
  recall   the share of the dense attention mass (summed over heads, every layer, queries past
           the first k positions, on the dense forward's hidden states) that falls on the keys
           the indexer selects

Variants: ``--rope-dims`` (RoPE on that many of the indexer's q/k dims, 0 = the original
indexer), ``--train-contexts`` (several: each step's batch is one window of a length drawn in
turn), ``--sink`` / ``--local`` (always keep the first tokens / the nearest ones, at selection
only, the rest of k goes to the indexer's best). The layer inputs of the training windows are
computed once (the model is frozen), so a step costs only the indexers' work.

    OMP_NUM_THREADS=1 python benchmarks/probes/dsa_indexer_probe.py --name rope16 --rope-dims 16 \\
        --out benchmarks/probes/dsa_indexer_probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.attention.indexcache import (  # noqa: E402
    DSA, dense_attention_probs, indexer_loss, layer_inputs, topk_from_scores)
from sparsedistill.data.text import load_corpus, split_documents, token_windows  # noqa: E402
from sparsedistill.distill.trainer import TrainConfig, train  # noqa: E402
from sparsedistill.models.gguf import gguf_tokenizer, load_gguf_llama  # noqa: E402


def forced_scores(scores: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """Scores with the first ``sink`` keys and each query's ``local`` nearest (itself included) raised above all others."""
    if not sink and not local:
        return scores
    sq, sk = scores.shape[-2:]
    t = torch.arange(sk - sq, sk, device=scores.device)[:, None]
    s = torch.arange(sk, device=scores.device)[None, :]
    force = ((s < sink) | ((s > t - local) & (s <= t)))
    return torch.where(force, torch.full_like(scores, 1e30), scores)


class Selector:
    """DSA's selection (all layers Full, reference scores) with optional forced sink / local keys.

    ``oracle``: instead of the indexer, the top-k keys of the layer's own dense attention (summed
    over heads) for the hidden states it gets: what k keys per query can do at best, for this target.
    """

    def __init__(self, dsa: DSA, sink: int, local: int, oracle=None) -> None:
        self.dsa, self.sink, self.local, self.oracle = dsa, sink, local, oracle

    def select(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.oracle is not None:
            probs = dense_attention_probs(self.oracle, layer, h).float().sum(1)
            causal = torch.ones(probs.shape[-2:], dtype=torch.bool).tril()
            return topk_from_scores(probs.masked_fill(~causal, float("-inf")), self.dsa.topk)
        if not self.sink and not self.local:
            return self.dsa(layer, h)
        return topk_from_scores(forced_scores(self.dsa.indexers[layer].scores(h), self.sink, self.local), self.dsa.topk)

    __call__ = select


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, select=None) -> float:
    total, count = 0.0, 0
    for x in windows.split(1):
        logits = model(x, select=select).float()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x.shape[1] - 1
    return total / count


@torch.no_grad()
def mass_recall(model, windows: torch.Tensor, sel: Selector, topk: int) -> float:
    """Mean over layers and queries t >= topk of the dense attention mass on the selected keys."""
    vals = []
    for x in windows.split(1):
        inputs = layer_inputs(model, x)
        for j, h in inputs.items():
            p = dense_attention_probs(model, j, h).float().mean(1)  # (1, S, S): heads summed, renormalised
            idx = sel(j, h)
            hit = p.gather(-1, idx.clamp(min=0).long()) * (idx >= 0)
            vals.append(hit.sum(-1)[:, topk:].mean())
    return float(torch.stack(vals).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--rope-dims", type=int, default=0)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--train-contexts", type=int, nargs="+", default=[512])
    ap.add_argument("--train-windows", type=int, default=48, help="distinct training windows per train context")
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--sparse-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sink", type=int, default=0)
    ap.add_argument("--local", type=int, default=0)
    ap.add_argument("--oracle", action="store_true", help="no indexer: top-k of the dense attention itself (an upper bound)")
    ap.add_argument("--eval-contexts", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--recall-tokens", type=int, default=2048)
    ap.add_argument("--corpora", nargs="+", default=["python-docs", "shakespeare"])
    ap.add_argument("--dense-cache", default="benchmarks/probes/dsa_indexer_probe_dense.json")
    ap.add_argument("--out", default="benchmarks/probes/dsa_indexer_probe.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write the trained indexers' state dict here")
    ap.add_argument("--load", help="skip training: the indexers from this state dict (--save of an earlier run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()

    model = load_gguf_llama(dtype=torch.float32).requires_grad_(False).eval()
    tok = gguf_tokenizer()
    splits = split_documents([d for c in args.corpora for d in load_corpus(c)])
    encode = lambda t: tok.encode(t).ids  # noqa: E731

    # Training: layer inputs of each window once (the model is frozen), then the recipe's loss and loop.
    t0 = time.time()
    pools = []
    for n in args.train_contexts if not (args.load or args.oracle) else []:
        w = token_windows(splits["train"], encode, n, args.train_windows, eos=2)
        pools.append([(x[None], layer_inputs(model, x[None])) for x in w])
    t_inputs = time.time() - t0
    torch.manual_seed(args.seed)
    dsa = DSA(model.cfg.n_layers, model.cfg.dim, args.topk, args.heads, args.head_dim,
              rope_dims=args.rope_dims, rope_theta=model.cfg.rope_theta)
    n_rows = min((len(p) for p in pools), default=0)

    def get(rows):  # batch of one length: the step's pool by turn, windows by the trainer's row order
        get.calls += 1
        pool = pools[get.calls % len(pools)]
        items = [pool[int(r)] for r in rows]
        return {j: torch.cat([it[1][j] for it in items]) for j in items[0][1]}
    get.calls = -1

    logs = {}
    t0 = time.time()
    if args.load:
        dsa.load_state_dict(torch.load(args.load))
    for job, steps, lr, sparse in [("warmup", args.warmup_steps, 1e-3, False), ("sparse", args.sparse_steps, 3e-4, True)]:
        if not steps or args.load or args.oracle:
            continue
        hist = []

        def loss_fn(net, inputs, sparse=sparse, hist=hist):
            loss = indexer_loss(model, net, inputs, sparse=sparse)
            hist.append(float(loss.detach()))
            return loss, {}
        train(dsa, loss_fn, get, n_rows, TrainConfig(steps=steps, batch_size=args.batch, lr=lr, log_every=10**9),
              job=job, seed=args.seed, progress=False)
        tail = hist[-max(1, len(hist) // 10):]
        logs[job] = {"first": hist[0], "last10pct": sum(tail) / len(tail)}
        print(f"{args.name} {job}: KL {hist[0]:.3f} -> {logs[job]['last10pct']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    t_train = time.time() - t0
    if args.save:
        torch.save(dsa.state_dict(), args.save)
    dsa.eval()

    dense_path = Path(args.dense_cache)
    dense = json.loads(dense_path.read_text()) if dense_path.exists() else {}
    sel = Selector(dsa, args.sink, args.local, model if args.oracle else None)
    result = {"name": args.name, "args": vars(args), "train": logs, "seconds": {"layer_inputs": t_inputs, "train": t_train}, "eval": {}}
    t0 = time.time()
    for n in args.eval_contexts:
        test = token_windows(splits["test"], encode, n, max(1, args.eval_tokens // n), eos=2)
        key = f"{n}/{len(test)}/{','.join(args.corpora)}"
        if key not in dense:
            dense[key] = mean_loss(model, test)
            dense_path.write_text(json.dumps(dense, indent=1))
        sparse_loss = mean_loss(model, test, sel)
        recall = mass_recall(model, test[: max(1, args.recall_tokens // n)], sel, args.topk)
        result["eval"][str(n)] = {"dense_ppl": math.exp(dense[key]), "dsa_ppl": math.exp(sparse_loss),
                                  "ratio": math.exp(sparse_loss - dense[key]), "recall": recall, "windows": len(test)}
        print(f"{args.name} @{n}: ratio {result['eval'][str(n)]['ratio']:.3f} recall {recall:.3f} ({time.time() - t0:.0f} s)", flush=True)
    result["seconds"]["eval"] = time.time() - t0
    result["seconds"]["total"] = time.time() - t_start
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
