"""The stage contract: a config (pydantic, no torch) and an implementation that runs it.

A stage receives the current model (a `ModelState`: module + source + edit log) and a `StageContext`,
and returns a `StageResult` with the new model state and what the report should say about it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from compresspipe.recipe.spec import StageConfig

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.context import StageContext

C = TypeVar("C", bound=StageConfig)

# What a stage did to the model, as the report states it.
# structural: shapes changed (params/MACs really drop); mask-only: weights zeroed, shapes unchanged;
# weights: only values changed (training); quantized: lower precision; export: files written, model unchanged.
StageKind = Literal["weights", "structural", "mask-only", "quantized", "export"]

# What a stage can declare it needs; the executor checks these before any stage runs.
Requirement = Literal["train_data", "calibration_data", "teacher"]


@dataclass(frozen=True)
class Need:
    """One thing a configured stage needs before it can run: data of a split, or a teacher model."""

    what: Requirement
    teacher: str | None = None  # for "teacher": "baseline" or the name of an earlier stage (None: a model spec)
    why: str = ""  # the setting that asks for it, for the error message


@dataclass
class StageResult:
    state: ModelState
    kind: StageKind = "weights"
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable, for people: metrics.json/report
    # deployable files the stage wrote, by format, relative to its folder (the report measures the one that ships)
    files: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class StagePlan:
    """What a stage predicts it will do, without training (for `compresspipe plan`)."""

    state: ModelState | None = None  # the model's predicted structure; None: unchanged
    layers: dict[str, Any] = field(default_factory=dict)  # resolved selection: layer -> amount, rank, ...
    notes: list[str] = field(default_factory=list)


class Stage(ABC, Generic[C]):
    """Implementation of one stage kind. Stateless apart from its config."""

    # what every configuration of the stage needs; `needs()` refines it per configuration
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: C):
        self.config = config

    def needs(self) -> list[Need]:
        """What this configured stage needs (data splits, a teacher); checked before any stage runs."""
        return [Need(what) for what in sorted(self.requires)]  # type: ignore[arg-type]

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan | None:
        """Predict the stage's effect cheaply, without training or writing files. None: cannot predict."""
        return None

    @abstractmethod
    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        """Transform the model; write any extra files into ctx.stage_dir."""


__all__ = ["C", "Need", "Requirement", "Stage", "StageConfig", "StageKind", "StagePlan", "StageResult"]
