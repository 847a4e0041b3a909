"""What every format module receives (an `ExportJob`) and the checks they share.

A format module is three functions: ``available() -> str | None`` (why it cannot run here),
``export(job, folder) -> list[Path]`` and ``verify(files, job) -> dict`` (max_abs_diff, top1_agreement,
accuracy, latency_ms). Verification compares with the PyTorch model on the same validation batches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.recipe.spec import LatencySpec
    from compresspipe.stages.export import ExportConfig
    from compresspipe.stages.quantize import OnnxInt8Handoff
    from compresspipe.ui import UI

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class ExportJob:
    """The model to export, its verification batches and PyTorch's answers on them."""

    config: ExportConfig
    state: ModelState
    module: nn.Module  # eval mode, on CPU
    stage: str
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # validation (inputs, labels)
    reference: list[torch.Tensor]  # the PyTorch model's logits on `batches`
    calibration: Callable[[int, int], Iterator[torch.Tensor]]  # (batch_size, batches) -> input batches
    latency: LatencySpec | None = None
    handoff: OnnxInt8Handoff | None = None  # what a quantize stage asked the ONNX int8 export to do
    float_module: nn.Module | None = None  # the float model int8 formats quantize (after a quantize stage)
    cpu: str = "portable"  # deploy.cpu, resolved: the CPUs int8 files must be exact on (deploy.cpu module)
    ui: UI | None = None  # progress of long steps (calibration)
    notes: list[str] = field(default_factory=list)
    shared: dict[str, Path] = field(default_factory=dict)  # files one format leaves for another (float onnx)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.state.input_shape)

    @property
    def dtype(self) -> torch.dtype:
        return input_dtype(self.module)

    def example(self, batch: int = 2) -> torch.Tensor:
        """A deterministic input; batch 2 so torch.export does not specialise the batch dimension to 1."""
        gen = torch.Generator().manual_seed(0)
        return torch.randn((batch, *self.input_shape), generator=gen).to(self.dtype)


def input_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter), float32 by default."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compare(job: ExportJob, run: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """Run `run` on every verification batch; its difference from PyTorch and its accuracy."""
    max_diff, agree, correct, ref_correct, count, loss = 0.0, 0, 0, 0, 0, 0.0
    for (inputs, labels), ref in zip(job.batches, job.reference, strict=True):
        out = torch.as_tensor(run(inputs)).float().reshape(ref.shape)
        ref = ref.float()
        diff = float((out - ref).abs().max())
        if not diff <= max_diff and max_diff == max_diff:  # a NaN sticks (max() would drop it)
            max_diff = diff
        loss += float(torch.nn.functional.cross_entropy(out, labels, reduction="sum"))
        pred = out.argmax(dim=1)
        agree += int((pred == ref.argmax(dim=1)).sum())
        correct += int((pred == labels).sum())
        ref_correct += int((ref.argmax(dim=1) == labels).sum())
        count += int(labels.numel())
    return {
        "samples": count,
        "max_abs_diff": max_diff,
        "top1_agreement": agree / max(count, 1),
        "accuracy": correct / max(count, 1),
        "loss": loss / max(count, 1),
        "pytorch_accuracy": ref_correct / max(count, 1),
    }


def per_sample(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a fixed-batch-1 runner so it takes any batch (one call per sample)."""

    def runner(inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.as_tensor(run(inputs[i : i + 1])) for i in range(inputs.shape[0])])

    return runner


def time_batches(job: ExportJob, run: Callable[[Any], Any], batch_sizes: list[int] | None = None,
                 prepare: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
    """Median milliseconds per call at each latency batch size (evaluate.latency), in the file's runtime.

    `prepare` turns the input tensor into what `run` takes (e.g. a numpy feed) once, outside the timing:
    the figure is the runtime's call, not our conversions around it.
    """
    spec = job.latency
    if spec is None or not spec.enabled:
        return {}
    sizes = list(spec.batch_sizes) if batch_sizes is None else [b for b in spec.batch_sizes if b in batch_sizes]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for bs in sizes:
        x = torch.randn((bs, *job.input_shape), generator=gen).to(job.dtype)
        x = prepare(x) if prepare is not None else x
        for _ in range(spec.warmup):
            run(x)
        times = []
        for _ in range(max(1, spec.iters)):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        out[str(bs)] = statistics.median(times) * 1000.0
    return out


def torch_runner(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = module(inputs)
        return out[0] if isinstance(out, tuple | list) else out

    return run


class torch_threads:
    """Pin torch's intra-op threads for a latency measurement, then restore them."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.previous = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


@dataclass(frozen=True)
class Exporter:
    """One format behind the common interface; `available` says why it cannot run here (None: it can)."""

    name: str
    suffix: str  # file name in the export folder
    available: Callable[[], str | None]
    export: Callable[[ExportJob, Path], list[Path]]
    verify: Callable[[list[Path], ExportJob], dict[str, Any]]
    int8: bool = False
    load_snippet: tuple[str, str] = ("", "")
    fixed_batch: bool = False  # the file runs batch 1 only (verified sample by sample)


def always() -> str | None:
    return None


def dynamic_batch_shapes(job: ExportJob) -> tuple[dict[int, Any]] | None:
    """torch.export dynamic_shapes for a batch dimension of any size >= 1 (None when fixed)."""
    if not job.config.dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1)},)
