"""Everything the report states about a PyTorch model, measured once after each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from compresspipe.metrics.accuracy import evaluate
from compresspipe.metrics.compute import count_macs, measure_latency
from compresspipe.metrics.size import count_nonzero, count_params
from compresspipe.recipe.spec import LatencySpec


def measure_model(module: torch.nn.Module, input_shape: tuple[int, ...], files: list[Path], val: DataLoader,
                  device: torch.device, latency: LatencySpec, on_batch: Any = None) -> dict[str, Any]:
    """Accuracy and loss on `val`, parameters, sparsity, bytes of `files`, MACs and eager CPU latency."""
    acc, loss = evaluate(module.to(device), val, device, on_batch)
    module.to("cpu")
    timed: dict[str, float] = {}
    if latency.enabled:
        measured = measure_latency(module, input_shape, latency.batch_sizes, latency.warmup, latency.iters,
                                   latency.threads)
        timed = {str(bs): ms for bs, ms in measured.items()}
    params = count_params(module)
    nonzero = count_nonzero(module)
    return {
        "accuracy": acc,
        "loss": loss,
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 0.0 if params == 0 else 1 - nonzero / params,
        "bytes": sum(p.stat().st_size for p in files),
        "macs": count_macs(module, input_shape),
        "latency_ms": timed,
    }
