"""Tasks: what a model's outputs mean, which loss trains them and which metric judges them. No torch at import.

`task:` in a recipe picks one; the Hugging Face Auto class follows it too (`models.hf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # a position without a label (padding); torch's cross-entropy skips it


@dataclass(frozen=True)
class TaskInfo:
    """One task: its default metric, the metrics the report gives, and the shape of its targets."""

    name: str
    description: str
    default_metric: str
    metrics: tuple[str, ...]  # reported for every row (the default first)
    per_position: bool = False  # outputs (batch, positions, classes), labels (batch, positions)
    float_targets: bool = False  # regression

    @property
    def has_accuracy(self) -> bool:
        return "top1" in self.metrics


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("classification", "one class per sample: cross-entropy on logits (batch, classes)", "top1",
             ("top1", "top5", "f1_macro")),
    TaskInfo("sequence_classification", "one class per sequence (text): cross-entropy", "top1",
             ("top1", "top5", "f1_macro")),
    TaskInfo("token_classification", "one class per token: cross-entropy over labelled tokens (-100: none)", "top1",
             ("top1", "f1_macro"), per_position=True),
    TaskInfo("regression", "float targets: mean squared error", "mse", ("mse", "mae"), float_targets=True),
    TaskInfo("language_modeling", "the next token at each position: cross-entropy (-100: none)", "perplexity",
             ("perplexity", "top1"), per_position=True),
)}


def task_info(task: str) -> TaskInfo:
    return TASKS[task]


def flatten(task: str, outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) as rows of a classification: (rows, classes) and (rows,), unlabelled positions dropped.
    Regression: both flattened to the same shape."""
    info = TASKS[task]
    if info.float_targets:
        out = outputs.float().reshape(outputs.shape[0], -1)
        return out, labels.float().reshape(out.shape)
    if info.per_position:
        out = outputs.float().reshape(-1, outputs.shape[-1])
        lab = labels.reshape(-1)
        keep = lab != IGNORE_INDEX
        return out[keep], lab[keep]
    return outputs.float().reshape(outputs.shape[0], -1), labels.reshape(-1)


def loss(task: str, outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
         reduction: str = "mean") -> torch.Tensor:
    """The task's training loss: cross-entropy (classes, tokens) or mean squared error (regression)."""
    import torch.nn.functional as F

    out, lab = flatten(task, outputs, labels)
    if TASKS[task].float_targets:
        err = F.mse_loss(out, lab, reduction="none").mean(dim=1)
        return err.sum() if reduction == "sum" else err.mean()
    if lab.numel() == 0:
        return out.sum() * 0.0
    return F.cross_entropy(out, lab, reduction=reduction, label_smoothing=label_smoothing)


def count(task: str, labels: torch.Tensor) -> int:
    """What a mean loss averages over: samples, or labelled positions for per-position tasks."""
    if TASKS[task].per_position:
        return int((labels != IGNORE_INDEX).sum())
    return int(labels.shape[0])


def distillation_target(task: str) -> str:
    """How a student learns from a teacher's outputs: a softened distribution (classes) or the values (regression)."""
    return "values" if TASKS[task].float_targets else "distribution"


def metric_direction(name: str) -> bool:
    """Whether more is better for the metric `name` (a registered metric; loss is lower-is-better)."""
    if name == "loss":
        return False
    from compresspipe.metrics import METRICS

    cls: Any = METRICS.get(name)
    return bool(cls.higher_is_better)
