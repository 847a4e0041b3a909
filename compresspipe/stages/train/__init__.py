"""`train`: supervised training with the shared training loop."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from compresspipe.recipe.training import TrainSettings
from compresspipe.stages.base import StageConfig


class TrainConfig(StageConfig, TrainSettings):
    """Supervised training: cross-entropy on the training split, best epoch kept by validation accuracy."""

    type: Literal["train"]
    implementation: ClassVar[str] = "compresspipe.stages.train.stage:TrainStage"
    example: ClassVar[dict[str, Any]] = {"type": "train", "epochs": 1}
