"""The distillation-core experiment on Fashion-MNIST (paper 6, "Sparse Knowledge Distillation").

Per seed: a dense MLP teacher, then sparse students initialised from it, comparing
  (a) KD vs cross-entropy-only fine-tuning at 90% unstructured and 2:4 sparsity;
  (b) one-shot vs n-stage pruning to the same final sparsity (the homotopy path), fit to 1/n;
  (c) teacher access: full logits vs top-k vs sampled classes vs hard labels;
  (d) softening-operator families at equal teacher entropy.
Every (seed, variant) is a job with a stable name; finished jobs are skipped on ``--resume``.
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..data import load_fashion_mnist
from ..distill import (
    OPERATORS,
    TeacherCache,
    TrainConfig,
    distill_loss,
    multistage_distill,
    predict,
    sampled_targets,
    temperature_for_entropy,
    train,
)
from ..distill.softening import entropy
from ..models import create_model
from ..runs import Run
from ..weights import MagnitudeSparsifier, NMSparsifier

__all__ = ["ExperimentConfig", "run_experiment"]


@dataclass
class DataConfig:
    train_subset: int = 0  # 0 = all 60,000 training images
    test_subset: int = 0  # 0 = the full 10,000-image test set


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512, 512])
    dropout: float = 0.1


@dataclass
class KDConfig:
    temperature: float = 4.0
    alpha: float = 1.0  # weight of the KD term; 1 - alpha goes to cross-entropy on true labels
    operator: str = "power"


@dataclass
class SparsityConfig:
    unstructured: float = 0.9  # for parts (a), (c), (d)
    n: int = 2
    m: int = 4
    multistage_target: float = 0.97  # final unstructured sparsity of part (b)
    stages: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    teacher_sources: list[str] = field(default_factory=lambda: ["previous", "original"])
    # "split": n stages share the one-shot step budget; "each": every stage gets the full budget.
    stage_budgets: list[str] = field(default_factory=lambda: ["split", "each"])
    schedule: str = "linear"
    path: str = "geometric"  # unstructured level -> sparsity mapping (see MagnitudeSparsifier)


@dataclass
class AccessConfig:
    topk: list[int] = field(default_factory=lambda: [1, 3])
    samples: int = 1  # classes drawn per example per step by the sampled teacher


@dataclass
class OperatorConfig:
    families: list[str] = field(default_factory=lambda: ["power", "exptilt", "odds"])
    # Entropy targets: the teacher's mean entropy under the power operator at these temperatures.
    reference_temperatures: list[float] = field(default_factory=lambda: [2.0, 4.0])


@dataclass
class ExperimentConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    parts: list[str] = field(default_factory=lambda: ["kd_vs_ce", "multistage", "teacher_access", "operators"])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4000, lr=1e-3, checkpoint_every=1000))
    student: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1600, lr=5e-4, checkpoint_every=800))
    kd: KDConfig = field(default_factory=KDConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    operators: OperatorConfig = field(default_factory=OperatorConfig)


PARTS = ("kd_vs_ce", "multistage", "teacher_access", "operators")


@dataclass
class Student:
    """One student variant: how it is sparsified and what it learns from."""

    sparsity: str  # "unstructured" | "2:4"
    target: float  # final unstructured sparsity (ignored for N:M)
    loss: str  # "ce" | "full" | "topk" | "sampled" | "hard"
    k: int = 0  # top-k size or number of samples
    stages: int = 1
    teacher_source: str = "previous"
    budget: str = "split"
    operator: str = "power"
    temperature: float = 4.0

    def name(self, seed: int) -> str:
        sp = "2of4" if self.sparsity == "2:4" else f"u{round(self.target * 100)}"
        loss = f"{self.loss}{self.k}" if self.loss in ("topk", "sampled") else self.loss
        parts = [sp, loss]
        if self.stages > 1:
            parts.append(f"n{self.stages}-{self.teacher_source}" + ("-each" if self.budget == "each" else ""))
        if self.loss != "ce" and (self.operator != "power" or self.temperature != 4.0):
            parts.append(f"{self.operator}-T{self.temperature:.4g}")
        return "-".join(parts) + f"-s{seed}"


def validate(cfg: ExperimentConfig) -> None:
    """Reject bad choices before any training starts, naming the valid ones."""
    sp = cfg.sparsity
    choices = [
        ("parts", cfg.parts, PARTS),
        ("kd.operator", [cfg.kd.operator], tuple(OPERATORS)),
        ("operators.families", cfg.operators.families, tuple(OPERATORS)),
        ("sparsity.teacher_sources", sp.teacher_sources, ("previous", "original")),
        ("sparsity.stage_budgets", sp.stage_budgets, ("split", "each")),
        ("sparsity.schedule", [sp.schedule], ("linear", "cubic")),
        ("sparsity.path", [sp.path], ("geometric", "linear")),
    ]
    for key, values, valid in choices:
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"{key}: {bad} not understood; choose from {list(valid)}")
    if not cfg.seeds:
        raise ValueError("seeds is empty; give at least one, e.g. --set seeds=[0]")
    if any(n < 1 for n in sp.stages):
        raise ValueError(f"sparsity.stages must be positive, got {sp.stages}")
    if not 0.0 <= cfg.kd.alpha <= 1.0:
        raise ValueError(f"kd.alpha must be in [0, 1], got {cfg.kd.alpha}")


class Experiment:
    def __init__(self, cfg: ExperimentConfig, run: Run, progress: bool = True) -> None:
        validate(cfg)
        self.cfg, self.run, self.progress = cfg, run, progress
        self.device = dist.init()
        self.data = load_fashion_mnist(cfg.data.train_subset, cfg.data.test_subset)
        self.train_x = self.data.train_x.to(self.device)
        self.train_y = self.data.train_y.to(self.device)
        self.test_x = self.data.test_x.to(self.device)
        self.test_y = self.data.test_y.to(self.device)
        self.teachers: dict[int, nn.Module] = {}
        self.caches: dict[int, TeacherCache] = {}

    # ---------------------------------------------------------------------------------- jobs
    def variants(self) -> tuple[dict[str, list[Student]], dict[float, dict[str, float]]]:
        """Student variants per part, and the equal-entropy temperatures of part (d)."""
        c, sp = self.cfg, self.cfg.sparsity
        T, op = c.kd.temperature, c.kd.operator
        u = dict(sparsity="unstructured", target=sp.unstructured, temperature=T, operator=op)
        out: dict[str, list[Student]] = {}
        if "kd_vs_ce" in c.parts:
            out["kd_vs_ce"] = [
                Student(**u, loss="full"), Student(**u, loss="ce"),
                Student("2:4", 0.5, "full", temperature=T, operator=op), Student("2:4", 0.5, "ce", temperature=T, operator=op),
            ]
        if "multistage" in c.parts:
            ms = dict(sparsity="unstructured", target=sp.multistage_target, loss="full", temperature=T, operator=op)
            out["multistage"] = [Student(**ms, stages=1)] + [
                Student(**ms, stages=n, teacher_source=src, budget=budget)
                for budget in sp.stage_budgets for src in sp.teacher_sources for n in sp.stages if n > 1
                if budget == "split" or src == "previous"  # the costly full-budget runs only for the homotopy path
            ]
        if "teacher_access" in c.parts:
            out["teacher_access"] = (
                [Student(**u, loss="full")]
                + [Student(**u, loss="topk", k=k) for k in c.access.topk]
                + [Student(**u, loss="sampled", k=c.access.samples), Student(**u, loss="hard")]
            )
        temps: dict[float, dict[str, float]] = {}
        if "operators" in c.parts:
            out["operators"] = []
            for t_ref in c.operators.reference_temperatures:
                temps[t_ref] = self.equal_entropy_temperatures(t_ref)
                for fam in c.operators.families:
                    out["operators"].append(Student(**{**u, "operator": fam, "temperature": round(temps[t_ref][fam], 4)}, loss="full"))
        return out, temps

    def equal_entropy_temperatures(self, t_ref: float) -> dict[str, float]:
        """Per family, the temperature giving the teacher (seed 0) the power operator's entropy at ``t_ref``."""
        probe = self.train_x[:: max(1, len(self.train_x) // 2000)]
        p = torch.softmax(predict(self.teacher(self.cfg.seeds[0]), probe).double(), -1).cpu()
        target = float(entropy(OPERATORS["power"](p, t_ref)).mean())
        return {fam: (t_ref if fam == "power" else temperature_for_entropy(OPERATORS[fam], p, target)) for fam in self.cfg.operators.families}

    def teacher(self, seed: int) -> nn.Module:
        if seed not in self.teachers:
            job = f"teacher-s{seed}"
            torch.manual_seed(seed)
            m = self.cfg.model
            model = create_model(m.name, hidden=m.hidden, dropout=m.dropout, num_classes=len(self.data.classes)).to(self.device)
            ce = lambda net, b: (F.cross_entropy(net(b[0]), b[1]), {})  # noqa: E731
            train(model, ce, self.batch, len(self.train_x), self.cfg.teacher, job=job, run=self.run, seed=seed, progress=self.progress)
            model.eval().requires_grad_(False)
            if self.run.result(job) is None:
                self.run.save_result(job, self.evaluate(job, model))
            self.teachers[seed] = model
        return self.teachers[seed]

    def cache(self, seed: int) -> TeacherCache:
        """The teacher's outputs on the training set, computed once (lossless: k = all classes)."""
        if seed not in self.caches:
            teacher = self.teacher(seed)
            path = self.run.artifact(f"teacher-cache-s{seed}")
            with dist.on_main_first():
                self.caches[seed] = TeacherCache.build(
                    path, lambda x: teacher(x).cpu(), self.train_x, k=len(self.data.classes),
                    fingerprint=f"teacher-s{seed}:{len(self.train_x)}", progress=self.progress,
                )
        return self.caches[seed]

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = rows.to(self.device)
        return self.train_x[r], self.train_y[r], rows

    def student(self, spec: Student, seed: int) -> dict[str, Any]:
        job = spec.name(seed)
        done = self.run.result(job)
        if done is not None:
            return done
        teacher = self.teacher(seed)
        cached = spec.loss in ("topk", "sampled", "hard")
        if cached and spec.stages > 1:
            raise ValueError(f"{job}: cached teacher modes hold the dense teacher only; multi-stage runs need loss='full'")
        cache = self.cache(seed) if cached else None
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        not_head = lambda name, mod: not name.startswith("head")  # noqa: E731  (the classifier stays dense)
        if spec.sparsity == "2:4":
            sparsifier = NMSparsifier(self.cfg.sparsity.n, self.cfg.sparsity.m, include=not_head)
        else:
            sparsifier = MagnitudeSparsifier(spec.target, include=not_head, path=self.cfg.sparsity.path)
        if spec.budget not in ("split", "each"):
            raise ValueError(f"stage budget must be 'split' or 'each', got {spec.budget!r}")
        steps = self.cfg.student.steps if spec.budget == "each" else max(1, self.cfg.student.steps // spec.stages)
        stage_cfg = TrainConfig(**{**vars(self.cfg.student), "steps": steps})
        torch.manual_seed(zlib.crc32(job.encode()))

        def train_stage(i: int, model: nn.Module, stage_teacher: nn.Module, sp: Any) -> None:
            loss_fn = self.loss_fn(spec, stage_teacher, cache, seed)
            train(model, loss_fn, self.batch, len(self.train_x), stage_cfg, job=f"{job}.stage{i}", run=self.run,
                  seed=seed * 100 + i, enforce=sp.enforce, progress=self.progress)

        t0 = time.time()
        multistage_distill(student, teacher, sparsifier, spec.stages, train_stage,
                           teacher_source=spec.teacher_source, schedule=self.cfg.sparsity.schedule)
        result = self.evaluate(job, student)
        result.update(spec=vars(spec), sparsity=sparsifier.masks.sparsity(), train_seconds=time.time() - t0)
        if spec.loss in ("topk", "hard"):
            k = spec.k if spec.loss == "topk" else 1
            result["teacher_mass_kept"] = float(cache.kept_mass(slice(None), k).mean())
        self.run.save_result(job, result)
        return result

    def loss_fn(self, spec: Student, teacher: nn.Module, cache: TeacherCache | None, seed: int) -> Callable:
        """``(model, batch) -> (loss, metrics)`` for one teacher access mode."""
        T, op, alpha = spec.temperature, spec.operator, self.cfg.kd.alpha

        def kd_term(logits: Tensor, x: Tensor, rows: Tensor) -> Tensor:
            """The KD loss for this access mode; only ``full`` runs the (stage) teacher."""
            if spec.loss == "full":
                with torch.no_grad():
                    t_logits = teacher(x)
                return distill_loss(logits, "full", teacher_logits=t_logits, T=T, operator=op)
            assert cache is not None
            if spec.loss == "topk":
                targets = cache.topk_targets(rows, spec.k, T, op)
            elif spec.loss == "sampled":
                # Fresh draws for every batch (and rank), the same ones again after a resume.
                g = torch.Generator().manual_seed(zlib.crc32(rows.numpy().tobytes(), seed))
                targets = sampled_targets(cache.full_logits(rows), spec.k, T, op, g)
            else:
                targets = cache.labels(rows)
            return distill_loss(logits, spec.loss, targets=targets.to(logits.device), T=T, operator=op)

        def loss(net: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            x, y, rows = batch
            logits = net(x)
            ce = F.cross_entropy(logits, y)
            if spec.loss == "ce":
                return ce, {"ce": ce.detach()}
            kd = kd_term(logits, x, rows)
            return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}

        return loss

    def evaluate(self, job: str, model: nn.Module) -> dict[str, Any]:
        logits = predict(model, self.test_x)
        probs = torch.softmax(logits, -1)
        if dist.is_main():
            pred_dir = self.run.artifact("predictions")
            pred_dir.mkdir(exist_ok=True)
            np.save(pred_dir / f"{job}.npy", probs.cpu().numpy())
        return {
            "job": job,
            "test_acc": float((logits.argmax(-1) == self.test_y).float().mean()),
            "test_nll": float(F.cross_entropy(logits, self.test_y)),
            "test_rows": len(self.test_y),
        }

    # ---------------------------------------------------------------------------------- main
    def run_all(self) -> dict[str, Any]:
        seeds = self.cfg.seeds
        for s in tqdm(seeds, desc="teachers", disable=not (self.progress and dist.is_main())):
            self.teacher(s)
        variants, temps = self.variants()
        jobs: dict[str, tuple[Student, int]] = {}
        for specs in variants.values():
            for spec in specs:
                for s in seeds:
                    jobs.setdefault(spec.name(s), (spec, s))
        for name, (spec, s) in tqdm(jobs.items(), desc="students", disable=not (self.progress and dist.is_main())):
            self.student(spec, s)
        return {
            "teachers": {s: self.run.result(f"teacher-s{s}") for s in seeds},
            "parts": {part: [[spec.name(s) for s in seeds] for spec in specs] for part, specs in variants.items()},
            "equal_entropy_temperatures": {str(k): v for k, v in temps.items()},
        }


def run_experiment(cfg: ExperimentConfig, run_dir: Path, resume: bool = False, progress: bool = True, command: str = "") -> Path:
    """Run (or resume) the experiment in ``run_dir`` and write ``report.md``; returns its path."""
    from .kd_report import write_report

    validate(cfg)
    dist.init()  # before Run, so that only rank 0 writes
    run = Run(run_dir, cfg, resume=resume, command=command)
    exp = Experiment(cfg, run, progress=progress)
    index = exp.run_all()
    index["data_source"] = str(exp.data.source)
    report = run.artifact("report.md")
    if dist.is_main():
        write_report(run, cfg, index)
    dist.barrier()
    return report
