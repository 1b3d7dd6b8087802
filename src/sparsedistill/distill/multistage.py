"""Multi-stage compression: walk a sparsity path in ``n`` stages, distilling at each stage.

One-shot pruning jumps from the dense teacher to the final sparsity; the homotopy path of the
Sparse-KD framework instead moves in ``n`` small steps, each distilled from the previous
stage's model (or from the original teacher), and predicts the final error gap to fall like
``O(1/n)``. The path is generic over a ``Sparsifier``: weight sparsifiers live in
``sparsedistill.weights``; attention and retrieval sparsifiers implement the same protocol.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, runtime_checkable

from torch import nn

__all__ = ["Sparsifier", "stage_levels", "StageRecord", "multistage_distill"]


@runtime_checkable
class Sparsifier(Protocol):
    """Moves a model along a sparsity path; ``level`` 0 is dense, 1 the sparsifier's target."""

    def step_to(self, model: nn.Module, level: float) -> dict[str, float]:
        """Sparsify ``model`` to ``level`` (never undoing earlier levels); return stats to log."""

    def enforce(self, model: nn.Module) -> None:
        """Restore the sparsity constraint after an optimizer step."""


def stage_levels(n_stages: int, schedule: Literal["linear", "cubic"] = "linear") -> list[float]:
    """Levels in (0, 1] for ``n_stages`` stages ending at 1.

    ``cubic`` is Zhu & Gupta's schedule (fast early, slow late); ``linear`` is the even homotopy.
    """
    if n_stages < 1:
        raise ValueError(f"need at least one stage, got {n_stages}")
    ts = [(i + 1) / n_stages for i in range(n_stages)]
    if schedule == "linear":
        return ts
    if schedule == "cubic":
        return [1 - (1 - t) ** 3 for t in ts]
    raise ValueError(f"unknown schedule {schedule!r}; use 'linear' or 'cubic'")


@dataclass
class StageRecord:
    stage: int
    level: float
    stats: dict[str, float]


StageFn = Callable[[int, nn.Module, nn.Module, Sparsifier], None]


def multistage_distill(
    student: nn.Module,
    teacher: nn.Module,
    sparsifier: Sparsifier,
    n_stages: int,
    train_stage: StageFn,
    *,
    teacher_source: Literal["previous", "original"] = "previous",
    schedule: Literal["linear", "cubic"] = "linear",
) -> list[StageRecord]:
    """Sparsify ``student`` in ``n_stages`` steps, calling ``train_stage`` after each one.

    ``train_stage(stage, student, stage_teacher, sparsifier)`` distills in place and must call
    ``sparsifier.enforce`` after optimizer steps. With ``teacher_source="previous"`` stage ``i``
    learns from a frozen copy of the stage ``i - 1`` student (stage 0 from ``teacher``).
    Deterministic given deterministic training, so a resumed run that replays finished stages
    from their checkpoints rebuilds the same masks.
    """
    if teacher_source not in ("previous", "original"):
        raise ValueError(f"teacher_source must be 'previous' or 'original', got {teacher_source!r}")
    records: list[StageRecord] = []
    stage_teacher = teacher
    for i, level in enumerate(stage_levels(n_stages, schedule)):
        stats = sparsifier.step_to(student, level)
        train_stage(i, student, stage_teacher, sparsifier)
        records.append(StageRecord(i, level, stats))
        if teacher_source == "previous" and i + 1 < n_stages:
            stage_teacher = copy.deepcopy(student).eval().requires_grad_(False)
    return records
