"""What a stage receives besides the model: data, device, seed, the baseline and earlier stages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compresspipe.artifacts.model import ModelState, load_model
from compresspipe.data.sources import DataSplits
from compresspipe.errors import StageConfigError
from compresspipe.recipe.spec import Recipe
from compresspipe.recipe.training import TrainSettings
from compresspipe.training.loop import BN_RECALIBRATION_BATCHES, FitResult, LossFn, fit, recalibrate_batchnorm
from compresspipe.ui import UI

CHECKPOINTS = ".checkpoints"


@dataclass
class StageRecord:
    """A finished stage as later stages see it."""

    index: int
    name: str
    type: str
    folder: Path
    metrics: dict[str, Any]


@dataclass(kw_only=True)
class StageContext:
    """Built with keywords: `StageContext(recipe=..., index=..., name=..., ...)`."""

    recipe: Recipe
    index: int
    name: str
    stage_dir: Path
    device: torch.device
    seed: int
    data: DataSplits
    ui: UI
    # "baseline" and every finished stage, by name, in order
    history: dict[str, StageRecord] = field(default_factory=dict)
    reference: str = "baseline"
    _cache: dict[str, ModelState] = field(default_factory=dict)
    # where training inside this stage keeps per-epoch state (shared by all ranks; rank 0 writes it);
    # removed when the stage completes
    checkpoint_root: Path | None = None
    # what the executor measured on the model this stage receives (accuracy, loss, ... of the previous row)
    input_metrics: dict[str, Any] = field(default_factory=dict)
    _fit_calls: int = 0
    # in a plan (and the run's preflight): the planned model after "baseline" and each earlier stage, by name
    planned: dict[str, ModelState] = field(default_factory=dict)
    # the run's preflight: plan() checks the configuration; it may skip what it measures (sensitivity, latency)
    preflight: bool = False

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_root or self.stage_dir / CHECKPOINTS

    def load_stage(self, name: str) -> ModelState:
        """A fresh copy of the model as it was after stage `name` ('baseline': the uncompressed reference).

        Called inside a run, where a `python:` model's code is allowed if the run allowed it."""
        if name == "baseline":
            name = self.reference
        record = self.history.get(name)
        if record is None and name in self.planned:
            return self.planned[name].clone()
        if record is None:
            raise StageConfigError(self.name, f"no finished stage named {name!r}; known: {', '.join(self.history or self.planned)}")
        if name not in self._cache:
            self._cache[name] = load_model(record.folder)
        return self._cache[name].clone()

    @property
    def task(self) -> str:
        return self.recipe.task

    def batches(self, split: str, count: int | None, batch_size: int | None = None,
                ) -> Iterator[tuple[Any, torch.Tensor]]:
        """The first `count` batches (None: all) of a split, in order, at `batch_size` (default eval_batch_size)."""
        loader = self.data.loader(split, batch_size or self.recipe.data.eval_batch_size)
        for i, batch in enumerate(loader):
            if count is not None and i >= count:
                break
            yield batch

    def recalibrate_batchnorm(self, module: torch.nn.Module) -> int:
        """Re-estimate every BatchNorm's running statistics on training batches (after pruning or factorizing,
        every layer's input moved); returns how many layers were re-estimated."""
        batches = self.batches("train", BN_RECALIBRATION_BATCHES, self.recipe.data.batch_size)
        return recalibrate_batchnorm(module, batches, self.device, only_slow=False)

    def fit(
        self,
        module: torch.nn.Module,
        settings: TrainSettings,
        loss_fn: LossFn | None = None,
        extra_params: list[torch.nn.Parameter] | None = None,
        label: str | None = None,
    ) -> FitResult:
        """Run the shared training loop on the training split (resumable at epoch granularity)."""
        self._fit_calls += 1
        return fit(
            module, self.data, settings, device=self.device, seed=self.seed + self.index,
            batch_size=self.recipe.data.batch_size, loss_fn=loss_fn, extra_params=extra_params,
            ui=self.ui, label=label or self.name, checkpoint_dir=self.checkpoints / f"fit-{self._fit_calls:02d}",
            task=self.recipe.task,
        )
