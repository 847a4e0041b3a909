"""The stage contract: a config (pydantic, no torch) and an implementation that runs it.

A stage receives the current model (a `ModelState`: module + source + edit log) and a `StageContext`,
and returns a `StageResult` with the new model state and what the report should say about it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from compresspipe.recipe.spec import StageConfig

if TYPE_CHECKING:
    from torch import nn

    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.context import StageContext

# (model) -> (accuracy, loss) on the sensitivity's validation samples
Score = Callable[["nn.Module"], tuple[float, float]]

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

    # -- sensitivity: the task metric after a one-shot change of one layer (`compresspipe sensitivity`) ----------

    def sensitivity_settings(self, ratios: list[float] | None = None) -> dict[str, Any] | None:
        """Everything a layer's sensitivity curve depends on besides the model and the data (the settings measured
        and the config fields that shape the change), JSON-serialisable: it keys the cache. None: this stage kind
        has no sensitivity."""
        return None

    def sensitivity_layers(self, state: ModelState, ctx: StageContext) -> dict[str, dict[str, Any]]:
        """The layers (or coupled groups, named by one layer) this configured stage would change, each with what
        the table says about it (type, parameters, coupled layers)."""
        raise NotImplementedError

    def sensitivity(self, state: ModelState, ctx: StageContext, layer: str, settings: dict[str, Any],
                    score: Score) -> list[dict[str, Any]]:
        """One point per setting: `layer` alone changed one-shot (no fine-tuning) on a copy of the model, scored.
        Each point has `setting` (a number or a label), `accuracy`, `loss` and anything else worth a column."""
        raise NotImplementedError


__all__ = ["C", "Need", "Requirement", "Score", "Stage", "StageConfig", "StageKind", "StagePlan", "StageResult"]
