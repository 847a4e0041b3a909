"""`train`: supervised training with the shared training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from compresspipe.recipe.training import TrainSettings
from compresspipe.stages.base import Stage, StageConfig, StagePlan, StageResult

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.context import StageContext


class TrainConfig(StageConfig, TrainSettings):
    """Supervised training: cross-entropy on the training split, best epoch kept by validation accuracy."""

    type: Literal["train"]
    implementation: ClassVar[str] = "compresspipe.stages.train:TrainStage"
    example: ClassVar[dict[str, Any]] = {"type": "train", "epochs": 1}


class TrainStage(Stage[TrainConfig]):
    requires = frozenset({"train_data"})

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        return StagePlan(notes=[f"{self.config.epochs} epoch(s); weights change, structure does not"])

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        result = ctx.fit(state.module, self.config)
        return StageResult(
            state=state,
            kind="weights",
            notes=[f"best epoch {result.best_epoch} of {result.epochs_run}"]
            + ([f"resumed after epoch {result.resumed_from_epoch}"] if result.resumed_from_epoch else []),
            details={"history": result.history, "best_epoch": result.best_epoch,
                     "samples_per_second": result.samples_per_second},
        )
