"""The builtin task metrics, accumulated batch by batch. Torch is imported inside the methods, so that the
registry (and the recipe layer that checks metric names) imports none.

A metric is a class with `name`, `higher_is_better`, the `tasks` it applies to, and `update(outputs, labels)` /
`result()`; a plugin registers one in the entry-point group ``compresspipe.metrics``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from compresspipe.metrics.tasks import TASKS, flatten

if TYPE_CHECKING:
    import torch

CLASS_TASKS = frozenset({"classification", "sequence_classification", "token_classification", "language_modeling"})


class Metric:
    """Base of a metric: accumulate with `update`, read with `result` (None when nothing was seen)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    tasks: ClassVar[frozenset[str]] = frozenset(TASKS)

    def __init__(self, task: str, num_classes: int | None = None):
        self.task, self.num_classes = task, num_classes

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> float | None:
        raise NotImplementedError


class _Counting(Metric):
    def __init__(self, task: str, num_classes: int | None = None):
        super().__init__(task, num_classes)
        self.hits, self.count = 0.0, 0

    def result(self) -> float | None:
        return self.hits / self.count if self.count else None


class Top1(_Counting):
    name = "top1"
    description = "share of samples (tokens) whose highest-scoring class is the label"
    tasks = CLASS_TASKS

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        out, lab = flatten(self.task, outputs, labels)
        self.hits += int((out.argmax(dim=1) == lab).sum())
        self.count += int(lab.numel())


class Top5(_Counting):
    name = "top5"
    description = "share of samples whose label is among the five highest-scoring classes"
    tasks = CLASS_TASKS

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        out, lab = flatten(self.task, outputs, labels)
        k = min(5, out.shape[1])
        self.hits += int((out.topk(k, dim=1).indices == lab[:, None]).any(dim=1).sum())
        self.count += int(lab.numel())


class F1Macro(Metric):
    name = "f1_macro"
    description = "F1 score averaged over the classes that occur (as labels or predictions), each counting equally"
    tasks = CLASS_TASKS

    def __init__(self, task: str, num_classes: int | None = None):
        super().__init__(task, num_classes)
        self.tp: Any = None
        self.fp: Any = None
        self.fn: Any = None

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        import torch

        out, lab = flatten(self.task, outputs, labels)
        n = max(out.shape[1], self.num_classes or 0)
        pred = out.argmax(dim=1)
        tp = torch.bincount(lab[pred == lab], minlength=n)
        fp = torch.bincount(pred[pred != lab], minlength=n)
        fn = torch.bincount(lab[pred != lab], minlength=n)
        if self.tp is None:
            self.tp, self.fp, self.fn = tp, fp, fn
        else:
            self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn

    def result(self) -> float | None:
        if self.tp is None:
            return None
        present = (self.tp + self.fp + self.fn) > 0
        if not bool(present.any()):
            return None
        f1 = 2 * self.tp / (2 * self.tp + self.fp + self.fn).clamp(min=1)
        return float(f1[present].double().mean())


class _Error(Metric):
    higher_is_better = False
    tasks = frozenset({"regression"})
    power: ClassVar[int] = 2

    def __init__(self, task: str, num_classes: int | None = None):
        super().__init__(task, num_classes)
        self.total, self.count = 0.0, 0

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        out, lab = flatten(self.task, outputs, labels)
        self.total += float(((out - lab).abs() ** self.power).double().sum())
        self.count += int(lab.numel())

    def result(self) -> float | None:
        return self.total / self.count if self.count else None


class MSE(_Error):
    name = "mse"
    description = "mean squared error over every target value"


class MAE(_Error):
    name = "mae"
    description = "mean absolute error over every target value"
    power = 1


class Perplexity(Metric):
    name = "perplexity"
    description = "exp of the mean cross-entropy per labelled token"
    higher_is_better = False
    tasks = CLASS_TASKS

    def __init__(self, task: str, num_classes: int | None = None):
        super().__init__(task, num_classes)
        self.total, self.count = 0.0, 0

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        import torch.nn.functional as F

        out, lab = flatten(self.task, outputs, labels)
        if lab.numel():
            self.total += float(F.cross_entropy(out, lab, reduction="sum"))
            self.count += int(lab.numel())

    def result(self) -> float | None:
        if not self.count:
            return None
        mean = self.total / self.count
        return math.exp(mean) if mean < 700 else math.inf


class Scorer:
    """The task's loss and metrics over batches of (outputs, labels): what evaluation, export verification and
    the deploy measurement all report."""

    def __init__(self, task: str, num_classes: int | None = None, names: list[str] | None = None):
        from compresspipe.metrics import METRICS

        self.task = task
        self.names = list(dict.fromkeys(names or TASKS[task].metrics))
        self.metrics: list[Metric] = [METRICS.get(n)(task, num_classes) for n in self.names]
        self.loss_sum, self.count = 0.0, 0

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        from compresspipe.metrics.tasks import count, loss

        labels = labels.to(outputs.device)
        self.loss_sum += float(loss(self.task, outputs, labels, reduction="sum"))
        self.count += count(self.task, labels)
        for m in self.metrics:
            m.update(outputs, labels)

    def result(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"loss": self.loss_sum / self.count if self.count else None}
        for name, m in zip(self.names, self.metrics, strict=True):
            out[name] = m.result()
        return out


def applicable(name: str, task: str) -> bool:
    from compresspipe.metrics import METRICS

    cls: Any = METRICS.get(name)
    return task in getattr(cls, "tasks", TASKS)
