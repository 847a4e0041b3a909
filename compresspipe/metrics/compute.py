"""MACs and CPU latency of one forward pass."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from compresspipe.metrics.modes import eval_mode, model_device


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int | None:
    """Multiply-accumulates of one sample's forward pass (FLOPs // 2); None when they cannot be counted.

    Counted with torch's FlopCounterMode. Quantized layers run their float emulation (F.linear, F.conv2d),
    so they count like the float layers they replace. Ops without a formula (element-wise, pooling) count
    as zero.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        x = torch.zeros((1, *input_shape), device=model_device(model))
        with (
            eval_mode(model),
            torch.no_grad(),
            FlopCounterMode(display=False) as counter,
        ):
            model(x)
        return int(counter.get_total_flops()) // 2
    except Exception:  # an op the counter or the model cannot run this way: the caller prints "n/a"
        return None


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
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
    generator = torch.Generator().manual_seed(0)
    results: dict[int, float] = {}
    torch.set_num_threads(threads)
    try:
        with eval_mode(model), torch.inference_mode():
            for batch_size in batch_sizes:
                x = torch.randn((batch_size, *input_shape), generator=generator)
                for _ in range(warmup):
                    model(x)
                times = []
                for _ in range(max(1, iters)):
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
                results[int(batch_size)] = statistics.median(times) * 1000.0
    finally:
        torch.set_num_threads(previous_threads)
    return results
