"""The task's loss and metrics over a data loader (top-1 accuracy and cross-entropy for classification)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from compresspipe.errors import InputError
from compresspipe.metrics.modes import eval_mode
from compresspipe.metrics.scores import Scorer
from compresspipe.metrics.tasks import TASKS
from compresspipe.models.inputs import forward, to_device


def evaluate_task(model: nn.Module, loader: Iterable, device: str | torch.device, task: str = "classification",
                  num_classes: int | None = None, metrics: list[str] | None = None,
                  on_batch: Callable[[], object] | None = None) -> dict[str, float | None]:
    """{"loss": mean loss, metric name: value, ...} in eval mode (the task's metrics unless `metrics` names
    others). Batches are moved to `device`; the model must already be there. `on_batch` is called after each
    batch (a progress bar)."""
    scorer = Scorer(task, num_classes, metrics)
    seen = 0
    with eval_mode(model), torch.no_grad():
        for inputs, labels in loader:
            outputs = forward(model, to_device(inputs, device))
            scorer.update(outputs.float(), labels.to(device))
            seen += int(labels.shape[0])
            if on_batch is not None:
                on_batch()
    if seen == 0:
        raise InputError("no samples to evaluate: the split is empty")
    return scorer.result()


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device,
             task: str = "classification") -> tuple[float, float]:
    """(the task's default metric, mean loss) in eval mode: top-1 accuracy in [0, 1] and mean cross-entropy per
    sample for classification."""
    default = TASKS[task].default_metric
    result = evaluate_task(model, loader, device, task, metrics=[default])
    value, loss = result[default], result["loss"]
    return (float("nan") if value is None else value), (float("nan") if loss is None else loss)
