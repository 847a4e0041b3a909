"""The train stage: the shared training loop on the training split."""

from __future__ import annotations

from compresspipe.artifacts.model import ModelState
from compresspipe.stages.base import Need, Stage, StagePlan, StageResult
from compresspipe.stages.context import StageContext
from compresspipe.stages.train import TrainConfig


class TrainStage(Stage[TrainConfig]):
    def needs(self) -> list[Need]:
        return [Need("train_data")] if self.config.epochs > 0 else []

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
