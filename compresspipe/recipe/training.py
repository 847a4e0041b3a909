"""Settings of the shared training loop, used by every stage that trains (config only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from compresspipe.recipe.spec import StrictModel


class TrainSettings(StrictModel):
    """Settings of the shared training loop (train, fine-tuning, distillation, QAT)."""

    epochs: int = Field(10, ge=0, description="passes over the training split")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["none", "cosine", "step"] = Field("cosine", description="learning-rate schedule over epochs")
    step_size: PositiveInt = Field(10, description="epochs between lr drops (schedule: step)")
    gamma: float = Field(0.1, gt=0, le=1, description="lr factor per step (schedule: step)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    batch_size: PositiveInt | None = Field(None, description="default: data.batch_size")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    keep_best: bool = Field(True, description="keep the epoch with the best validation accuracy")


class FinetuneSettings(TrainSettings):
    """Recovery training after a compression step."""

    epochs: int = Field(3, ge=0)
    lr: float = Field(5e-4, gt=0)
