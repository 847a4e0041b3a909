"""Accuracy, size, parameters, sparsity, MACs and latency: pure functions over a model.

Imports torch; the recipe layer must not import this package.
"""

from compresspipe.metrics.accuracy import evaluate
from compresspipe.metrics.compute import count_macs, measure_latency
from compresspipe.metrics.size import count_nonzero, count_params, files_bytes, sparsity

__all__ = [
    "count_macs",
    "count_nonzero",
    "count_params",
    "evaluate",
    "files_bytes",
    "measure_latency",
    "sparsity",
]
