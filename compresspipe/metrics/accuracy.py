"""Top-1 accuracy and cross-entropy over a data loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from compresspipe.errors import InputError
from compresspipe.metrics.modes import eval_mode


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device,
             on_batch: Callable[[], object] | None = None) -> tuple[float, float]:
    """(top-1 accuracy in [0, 1], mean cross-entropy per sample) in eval mode.

    Batches are moved to `device`; the model must already be there.
    """
    correct, loss_sum, count = 0, 0.0, 0
    with eval_mode(model), torch.no_grad():
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += int(labels.numel())
            if on_batch is not None:
                on_batch()
    if count == 0:
        raise InputError("no samples to evaluate: the split is empty")
    return correct / count, loss_sum / count
