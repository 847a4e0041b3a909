"""Parameter counts, sparsity and file sizes.

What counts as a parameter: each logical weight element once. That is every ``nn.Parameter``
(tied weights once), read through a ``torch.nn.utils.prune`` mask when one is attached, plus the
weight and bias of quantized layers, which keep them as int buffers and expose them as ``weight()`` and
``bias()`` methods. Other buffers (BatchNorm statistics, quantization scales) are not parameters.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn


def _parameter_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            mask = module._buffers.get(name[: -len("_orig")] + "_mask") if name.endswith("_orig") else None
            yield param.detach() * mask if mask is not None else param.detach()
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, torch.Tensor):
            yield from _method_tensors(module)


def _method_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """weight() and bias() of a quantized layer; skipped if the module is not one after all."""
    for attr in ("weight", "bias"):
        getter = getattr(module, attr, None)
        if not callable(getter):
            continue
        try:
            t = getter()
        except Exception:  # a method named weight that is not a weight getter
            continue
        if isinstance(t, torch.Tensor):
            yield t.detach()


def _nonzero(t: torch.Tensor) -> int:
    try:
        return int(torch.count_nonzero(t))
    except (
        RuntimeError,
        NotImplementedError,
        TypeError,
    ):  # tensor subclasses (e.g. torchao) may not support it
        return int(torch.count_nonzero(t.dequantize()))


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (see the module docstring for what counts)."""
    return sum(t.numel() for t in _parameter_tensors(model))


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero parameter elements, pruning masks applied (a quantized weight: its int values)."""
    return sum(_nonzero(t) for t in _parameter_tensors(model))


def sparsity(model: nn.Module) -> float:
    """Fraction of zero elements over all parameters, biases and norm weights included."""
    total = count_params(model)
    return 0.0 if total == 0 else 1.0 - count_nonzero(model) / total


def files_bytes(paths: Iterable[str | Path]) -> int:
    """Total size on disk; a folder counts every file under it."""
    total = 0
    for path in map(Path, paths):
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            total += os.stat(path).st_size
    return total
