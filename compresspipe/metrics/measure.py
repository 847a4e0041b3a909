"""Everything the report states about a PyTorch model, measured once after each stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from compresspipe.metrics.accuracy import evaluate_task
from compresspipe.metrics.compute import count_macs, measure_latency
from compresspipe.metrics.size import count_nonzero, count_params
from compresspipe.metrics.tasks import TASKS
from compresspipe.recipe.spec import LatencySpec

if TYPE_CHECKING:
    from compresspipe.artifacts.io import ModelIO


def task_figures(scores: dict[str, float | None], task: str) -> dict[str, Any]:
    """A row's quality figures from a Scorer result: `metrics` (all), `metric` (the task's default), `score` (its
    value), `loss`, and `accuracy` (top-1, where the task has it)."""
    info = TASKS[task]
    return {"accuracy": scores.get("top1") if info.has_accuracy else None, "loss": scores.get("loss"),
            "metric": info.default_metric, "score": scores.get(info.default_metric),
            "metrics": {k: v for k, v in scores.items() if k != "loss"}}


def measure_model(module: torch.nn.Module, io: ModelIO, files: list[Path], val: DataLoader,
                  device: torch.device, latency: LatencySpec, num_classes: int | None = None,
                  metrics: list[str] | None = None, on_batch: Any = None) -> dict[str, Any]:
    """The task's metrics and loss on `val`, parameters, sparsity, bytes of `files`, MACs and eager CPU latency."""
    task = io.task
    names = list(dict.fromkeys([*TASKS[task].metrics, *(metrics or [])]))
    scores = evaluate_task(module.to(device), val, device, task, num_classes, names, on_batch)
    module.to("cpu")
    timed: dict[str, float] = {}
    if latency.enabled:
        measured = measure_latency(module, io, latency.batch_sizes, latency.warmup, latency.iters, latency.threads)
        timed = {str(bs): ms for bs, ms in measured.items()}
    params = count_params(module)
    nonzero = count_nonzero(module)
    return {
        **task_figures(scores, task),
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 0.0 if params == 0 else 1 - nonzero / params,
        "bytes": sum(p.stat().st_size for p in files),
        "macs": count_macs(module, io),
        "latency_ms": timed,
    }
