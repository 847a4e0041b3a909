"""MACs and CPU latency of one forward pass."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from compresspipe.metrics.modes import eval_mode, model_device
from compresspipe.models.inputs import example, forward, zeros

if TYPE_CHECKING:
    from compresspipe.artifacts.io import ModelIO


def _io(spec: ModelIO | Sequence[int]) -> ModelIO:
    from compresspipe.artifacts.io import ModelIO

    return spec if isinstance(spec, ModelIO) else ModelIO.single(list(spec))


def count_macs(model: nn.Module, input_shape: ModelIO | Sequence[int]) -> int | None:
    """Multiply-accumulates of one sample's forward pass (FLOPs // 2); None when they cannot be counted.

    Counted with torch's FlopCounterMode. Quantized layers run their float emulation (F.linear, F.conv2d),
    so they count like the float layers they replace. Ops without a formula (element-wise, pooling) count
    as zero.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        x = zeros(_io(input_shape), 1, device=model_device(model))
        with (
            eval_mode(model),
            torch.no_grad(),
            FlopCounterMode(display=False) as counter,
        ):
            forward(model, x)
        return int(counter.get_total_flops()) // 2
    except Exception:  # an op the counter or the model cannot run this way: the caller prints "n/a"
        return None


def measure_latency(
    model: nn.Module,
    input_shape: ModelIO | Sequence[int],
    batch_sizes: Sequence[int],
    warmup: int,
    iters: int,
    threads: int,
) -> dict[int, float]:
    """Median milliseconds per forward pass on CPU at a fixed thread count, per batch size.

    Numbers are comparable within one run on one machine, not across machines.
    """
    if model_device(model).type != "cpu":
        model = copy.deepcopy(model).to("cpu")  # the caller's model stays where it is
    previous_threads = torch.get_num_threads()
    io = _io(input_shape)
    results: dict[int, float] = {}
    torch.set_num_threads(threads)
    try:
        with eval_mode(model), torch.inference_mode():
            for batch_size in batch_sizes:
                x = example(io, batch_size)
                for _ in range(warmup):
                    forward(model, x)
                times = []
                for _ in range(max(1, iters)):
                    start = time.perf_counter()
                    forward(model, x)
                    times.append(time.perf_counter() - start)
                results[int(batch_size)] = statistics.median(times) * 1000.0
    finally:
        torch.set_num_threads(previous_threads)
    return results
