"""Task metrics (a registry), accuracy, size, parameters, sparsity, MACs and latency: pure functions over a model.

The package itself imports no torch, so the recipe layer can check metric names (`METRICS`); the functions
below import torch on first use. A plugin adds a metric through the entry-point group ``compresspipe.metrics``
(name: the metric's name, value: ``package.module:MetricClass``, a `compresspipe.metrics.scores.Metric`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compresspipe.registry import Registry

METRICS: Registry = Registry("metric", "compresspipe.metrics")
for _name, _cls in (("top1", "Top1"), ("top5", "Top5"), ("f1_macro", "F1Macro"), ("mse", "MSE"), ("mae", "MAE"),
                    ("perplexity", "Perplexity")):
    METRICS.register(_name, f"compresspipe.metrics.scores:{_cls}")

if TYPE_CHECKING:
    from compresspipe.metrics.accuracy import evaluate, evaluate_task
    from compresspipe.metrics.compute import count_macs, measure_latency
    from compresspipe.metrics.size import count_nonzero, count_params, files_bytes, sparsity

_LAZY = {"evaluate": "accuracy", "evaluate_task": "accuracy", "count_macs": "compute", "measure_latency": "compute",
         "count_nonzero": "size", "count_params": "size", "files_bytes": "size", "sparsity": "size"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compresspipe.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"compresspipe.metrics.{module}"), name)


__all__ = [
    "METRICS",
    "count_macs",
    "count_nonzero",
    "count_params",
    "evaluate",
    "evaluate_task",
    "files_bytes",
    "measure_latency",
    "sparsity",
]
