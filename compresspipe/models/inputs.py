"""Batches for any model: one tensor (`input_shape`), or named tensors (an `inputs:` spec) passed as keywords.

Every place that runs a model (training, evaluation, MACs, latency, calibration, tracing, export, the deploy
runtimes) goes through these helpers, so a model with `input_ids` and `attention_mask` runs wherever an image
model does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from compresspipe.artifacts.io import ModelIO
    from compresspipe.recipe.spec import InputTensor

Batch = torch.Tensor | dict[str, torch.Tensor]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def forward(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's output tensor for a batch: named tensors go in as keywords; a tuple's first item or a
    transformers output's `logits` comes out."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    if isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    return out  # type: ignore[no-any-return]


def to_device(x: Any, device: str | torch.device) -> Any:
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, torch.Tensor) else x


def batch_len(x: Any) -> int:
    """Samples in a batch (its first tensor's first axis)."""
    if isinstance(x, Mapping):
        return batch_len(next(iter(x.values())))
    return int(x.shape[0])


def float_to(x: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a batch to `dtype`; token ids and masks keep theirs."""
    if isinstance(x, Mapping):
        return {k: float_to(v, dtype) for k, v in x.items()}
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def take(x: Any, index: Any) -> Any:
    """Rows `index` of a batch (a slice or index tensor)."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def cat(batches: list[Any]) -> Any:
    if batches and isinstance(batches[0], Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(batches)


def example_tensor(spec: InputTensor, batch: int, generator: torch.Generator,
                   float_dtype: torch.dtype | None = None, sizes: dict[str, int] | None = None) -> torch.Tensor:
    """A deterministic input for one spec entry: gaussian floats, integers drawn from its range ([0, 2) by
    default), attention masks all ones. `sizes` overrides dynamic axes by name (e.g. {"sequence": 17})."""
    shape = [batch, *[(sizes or {}).get(spec.dynamic.get(i, ""), d) for i, d in enumerate(spec.shape)]]
    if spec.is_float:
        t = torch.randn(shape, generator=generator)
        return t.to(float_dtype or DTYPES[spec.dtype])
    if "mask" in spec.name:  # an attention mask takes 0 and 1; an example attends to every token
        return torch.ones(shape, dtype=DTYPES[spec.dtype])
    low, high = spec.range if spec.range is not None else (0, 2)
    t = torch.randint(low, high, shape, generator=generator)
    return t.to(DTYPES[spec.dtype])


def example(io: ModelIO, batch: int = 1, seed: int = 0, float_dtype: torch.dtype | None = None,
            device: str | torch.device | None = None, sizes: dict[str, int] | None = None) -> Any:
    """A deterministic batch of `batch` samples as the model takes it (a tensor, or a dict of named tensors)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {s.name: example_tensor(s, batch, gen, float_dtype, sizes) for s in io.inputs}
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors["input"] if io.single_tensor else tensors


def zeros(io: ModelIO, batch: int = 1, device: str | torch.device | None = None,
          float_dtype: torch.dtype | None = None) -> Any:
    """An all-zeros batch (masks all ones, so attention sees every token), e.g. for counting MACs."""
    tensors = {}
    for s in io.inputs:
        dtype = (float_dtype or DTYPES[s.dtype]) if s.is_float else DTYPES[s.dtype]
        low = s.range[0] if s.range is not None else 0
        fill = 1 if "mask" in s.name and not s.is_float else low
        tensors[s.name] = torch.full((batch, *s.shape), fill, dtype=dtype, device=device)
    return tensors["input"] if io.single_tensor else tensors


def args_and_kwargs(x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional, keyword) arguments for tracing and export: a tensor positionally, named tensors by keyword."""
    if isinstance(x, Mapping):
        return (), dict(x)
    return (x,), {}


def numpy_feed(x: Any, names: list[str], dtypes: dict[str, str] | None = None) -> dict[str, Any]:
    """A runtime feed {graph input name: numpy array}; a single tensor feeds the graph's one input."""
    dtypes = dtypes or {}
    if isinstance(x, Mapping):
        return {n: _np(x[n], dtypes.get(n)) for n in names if n in x}
    return {names[0]: _np(x, dtypes.get(names[0]))}


def _np(t: torch.Tensor, dtype: str | None) -> Any:
    arr = t.detach().cpu().numpy()
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def sample_bytes(io: ModelIO) -> int:
    return sum(math.prod(s.shape) * DTYPES[s.dtype].itemsize for s in io.inputs)
