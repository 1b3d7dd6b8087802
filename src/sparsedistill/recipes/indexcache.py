"""IndexCache on SmolLM2-135M (paper 4): DSA conversion, then sharing top-k selections across layers.

Jobs (each skipped on ``--resume`` once its result exists):
  dense-ppl                 perplexity of the dense model at every context length
  dsa-warmup, dsa-sparse    lightning indexers trained against the dense attention (all layers Full):
                            warm-up by KL over all keys, then KL on the selected keys
  dsa-ppl                   perplexity with top-k attention in every layer
  pattern-{method}-{n}      IndexCache patterns keeping n Full layers: uniform interleaving, greedy
                            search on calibration loss (training-free), and trained (multi-layer
                            distillation of the kept indexers, starting from the DSA indexers)
The main model stays frozen. Test windows never train or select anything; calibration windows
drive the greedy search.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as dist
from ..attention.indexcache import DSA, IndexPattern, greedy_pattern, indexer_loss, layer_inputs, topk_overlap
from ..data.text import load_corpus, split_documents, token_windows
from ..distill import TrainConfig, train
from ..models.gguf import gguf_tokenizer, load_gguf_llama
from ..runs import Run

__all__ = ["IndexCacheConfig", "run_indexcache"]


@dataclass
class DataConfig:
    corpora: list[str] = field(default_factory=lambda: ["python-docs", "shakespeare"])
    train_context: int = 2048  # the calibration windows' length; the training windows' too unless train_contexts is set
    train_contexts: list[int] = field(default_factory=lambda: [2048, 4096])  # each step's batch is windows of one of them; [] = train_context
    eval_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    eval_tokens: int = 65536  # test tokens per context length
    calibration_tokens: int = 8192
    train_windows: int = 512  # per training length


@dataclass
class IndexerConfig:
    heads: int = 4
    head_dim: int = 32
    topk: int = 256
    rope_dims: int = 16  # of head_dim rotated by position (RoPE at the model's base), as DeepSeek-V3.2's indexer; 0: none
    sink: int = 1  # first keys every selection keeps (the attention sink), out of topk
    local: int = 16  # each query's nearest keys (itself included) every selection keeps, out of topk


@dataclass
class IndexCacheConfig:
    seed: int = 0
    dtype: str = "bfloat16"  # the frozen LM's dtype on a GPU (fp32 on a CPU)
    data: DataConfig = field(default_factory=DataConfig)
    indexer: IndexerConfig = field(default_factory=IndexerConfig)
    warmup: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=1, lr=1e-3, log_every=25, checkpoint_every=100))
    sparse: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=1, lr=3e-4, log_every=25, checkpoint_every=100))
    trained: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, batch_size=1, lr=3e-4, log_every=25, checkpoint_every=75))
    keep_fractions: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    methods: list[str] = field(default_factory=lambda: ["uniform", "greedy", "trained"])


def validate(cfg: IndexCacheConfig) -> None:
    bad = set(cfg.methods) - {"uniform", "greedy", "trained"}
    if bad:
        raise ValueError(f"methods: {sorted(bad)} not understood; choose from ['uniform', 'greedy', 'trained']")
    if any(not 0 < f <= 1 for f in cfg.keep_fractions):
        raise ValueError(f"keep_fractions must be in (0, 1], got {cfg.keep_fractions}")
    if cfg.indexer.rope_dims % 2 or not 0 <= cfg.indexer.rope_dims <= cfg.indexer.head_dim:
        raise ValueError(f"indexer.rope_dims must be even and in [0, head_dim {cfg.indexer.head_dim}], got {cfg.indexer.rope_dims}")
    i = cfg.indexer
    if min(i.sink, i.local) < 0 or i.sink + i.local > i.topk:
        raise ValueError(f"indexer.sink {i.sink} and indexer.local {i.local} must be >= 0 and fit in topk {i.topk}")
    if cfg.indexer.topk >= min([cfg.data.train_context, *cfg.data.train_contexts]):
        raise ValueError(f"indexer.topk {cfg.indexer.topk} must be below every training context "
                         f"({cfg.data.train_context}, {cfg.data.train_contexts})")
    if max([cfg.data.train_context, *cfg.data.train_contexts]) > 8192:
        raise ValueError("SmolLM2-135M was trained for 8,192 tokens; train contexts must not exceed it")
    if max(cfg.data.eval_contexts) > 8192:
        raise ValueError("SmolLM2-135M was trained for 8,192 tokens; eval_contexts must not exceed it")


def uniform_pattern(n_layers: int, n_full: int) -> IndexPattern:
    """``n_full`` Full layers spread evenly, layer 0 first."""
    full = {round(i * n_layers / n_full) for i in range(n_full)}
    return IndexPattern("".join("F" if i in full else "S" for i in range(n_layers)))


class IndexCacheExperiment:
    def __init__(self, cfg: IndexCacheConfig, run: Run, progress: bool = True) -> None:
        validate(cfg)
        self.cfg, self.run, self.progress = cfg, run, progress
        self.device = dist.init()
        dtype = getattr(torch, cfg.dtype) if self.device.type == "cuda" else torch.float32
        self.model = load_gguf_llama(dtype=dtype).to(self.device).requires_grad_(False)
        self.tok = gguf_tokenizer()
        docs = [d for c in cfg.data.corpora for d in load_corpus(c)]
        self.splits = split_documents(docs)
        encode = lambda t: self.tok.encode(t).ids  # noqa: E731
        eos = 2
        d = cfg.data
        self.train_windows = [token_windows(self.splits["train"], encode, n, d.train_windows, eos)
                              for n in d.train_contexts or [d.train_context]]
        self.calib = token_windows(self.splits["calibration"], encode, d.train_context, max(1, d.calibration_tokens // d.train_context), eos)
        self.test = {n: token_windows(self.splits["test"], encode, n, max(1, d.eval_tokens // n), eos) for n in d.eval_contexts}
        self.n_layers = self.model.cfg.n_layers

    def new_dsa(self, pattern: IndexPattern | None = None) -> DSA:
        i = self.cfg.indexer
        torch.manual_seed(self.cfg.seed)
        return DSA(self.n_layers, self.model.cfg.dim, i.topk, i.heads, i.head_dim, pattern,
                   rope_dims=i.rope_dims, rope_theta=self.model.cfg.rope_theta, sink=i.sink,
                   local=i.local).to(self.device)

    @torch.no_grad()
    def loss(self, windows: Tensor, dsa: DSA | None = None, batch: int = 1) -> float:
        """Mean next-token loss (nats) over ``windows``."""
        total, count = 0.0, 0
        for s in range(0, len(windows), batch):
            x = windows[s : s + batch].to(self.device)
            logits = self.model(x, select=dsa).float()
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
            count += x[:, 1:].numel()
        return total / count

    def perplexities(self, dsa: DSA | None) -> dict[str, float]:
        return {str(n): math.exp(self.loss(w, dsa)) for n, w in self.test.items()}

    def train_indexers(self, dsa: DSA, job: str, tc: TrainConfig, sparse: bool) -> DSA:
        def loss_fn(net, x):  # one process: the DSA module is called as a selector, not through DDP's forward
            return indexer_loss(self.model, net, layer_inputs(self.model, x), sparse=sparse), {}

        lengths = self.train_windows
        # One length per batch, picked by the batch's first row (the trainer's seeded order, so resumes pick alike).
        get = lambda rows: lengths[int(rows[0]) % len(lengths)][rows].to(self.device)  # noqa: E731
        n_rows = min(len(w) for w in lengths)
        train(dsa, loss_fn, get, n_rows, tc, job=job, run=self.run, seed=self.cfg.seed, progress=self.progress)
        return dsa

    def overlaps(self, dsa: DSA) -> list[float]:
        """Top-k overlap between adjacent layers' own selections, on one calibration window (all layers Full)."""
        full = copy.copy(dsa)
        full.pattern = IndexPattern.full(self.n_layers)
        with torch.no_grad():
            self.model(self.calib[:1].to(self.device), select=full)
        return [topk_overlap(full.selected[i + 1], full.selected[i]) for i in range(self.n_layers - 1)]

    def job(self, name: str, fn) -> dict[str, Any]:
        done = self.run.result(name)
        if done is None:
            t0 = time.time()
            done = {"job": name, **fn(), "seconds": time.time() - t0}
            self.run.save_result(name, done)
        return done

    def run_all(self) -> dict[str, Any]:
        cfg = self.cfg
        self.job("dense-ppl", lambda: {"perplexity": self.perplexities(None)})
        dsa = self.new_dsa()
        self.train_indexers(dsa, "dsa-warmup", cfg.warmup, sparse=False)
        self.train_indexers(dsa, "dsa-sparse", cfg.sparse, sparse=True)
        self.job("dsa-ppl", lambda: {"perplexity": self.perplexities(dsa), "calibration_loss": self.loss(self.calib, dsa),
                                     "adjacent_overlap": self.overlaps(dsa)})
        bar = tqdm(total=len(cfg.keep_fractions) * len(cfg.methods), desc="patterns", disable=not self.progress)
        for frac in cfg.keep_fractions:
            n_full = max(1, round(frac * self.n_layers))
            for method in cfg.methods:
                self.job(f"pattern-{method}-{n_full}", lambda m=method, n=n_full: self.pattern_job(dsa, m, n))
                bar.update()
        bar.close()
        return {"n_layers": self.n_layers}

    def pattern_job(self, dsa: DSA, method: str, n_full: int) -> dict[str, Any]:
        out: dict[str, Any] = {"method": method, "n_full": n_full}
        if method == "uniform":
            pattern = uniform_pattern(self.n_layers, n_full)
        elif method == "greedy":
            def calib_loss(p: IndexPattern) -> float:
                dsa.pattern = p
                return self.loss(self.calib, dsa)
            # Continue the search to a larger target, if one ran: the same path, n_layers^2 / 2 evaluations in all.
            earlier = [r for n in range(n_full + 1, self.n_layers + 1) if (r := self.run.result(f"pattern-greedy-{n}"))]
            start = [tuple(step) for step in earlier[0]["search_path"]] if earlier else None
            pattern, path = greedy_pattern(self.n_layers, n_full, calib_loss, start=start)
            out["search_path"] = path
        else:  # trained: multi-layer distillation of the kept indexers on the greedy pattern (or uniform if absent)
            greedy = self.run.result(f"pattern-greedy-{n_full}")
            pattern = IndexPattern(greedy["pattern"]) if greedy else uniform_pattern(self.n_layers, n_full)
            dsa = copy.deepcopy(dsa)
            dsa.pattern = pattern
            self.train_indexers(dsa, f"trained-{n_full}", self.cfg.trained, sparse=False)
        dsa.pattern = pattern
        out |= {"pattern": str(pattern), "index_topk_freq": pattern.freq(), "perplexity": self.perplexities(dsa),
                "calibration_loss": self.loss(self.calib, dsa)}
        dsa.pattern = IndexPattern.full(self.n_layers)
        return out


def run_indexcache(cfg: IndexCacheConfig, run_dir: Path, resume: bool = False, progress: bool = True, command: str = "") -> Path:
    """Run (or resume) the experiment and write ``report.md``; returns its path."""
    from .indexcache_report import write_report

    validate(cfg)
    dist.init()
    if dist.world_size() > 1:
        raise ValueError("indexcache runs in one process (its indexers train as selectors, outside DDP); drop torchrun")
    run = Run(run_dir, cfg, resume=resume, command=command)
    IndexCacheExperiment(cfg, run, progress).run_all()
    report = run.artifact("report.md")
    if dist.is_main():
        write_report(run)
    dist.barrier()
    return report
