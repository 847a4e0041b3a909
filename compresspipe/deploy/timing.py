"""Latency in the deploy runtime, measured interleaved, with a noise bound.

Every file is timed once per round, in a rotating order, so a burst of load on a shared machine hits all
of them alike. A row's latency is the median of its per-round medians; its speedup is the median of the
per-round ratios reference / row, and the interquartile range of those ratios is the noise bound that
gates respect (a limit inside it is re-measured before it is judged).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from compresspipe.artifacts.io import ModelIO
from compresspipe.models.inputs import example, forward, numpy_feed

ROUND_BUDGET_S = 0.05  # time one file gets per round; iterations adapt to it (at least one call)


def row_io(row: dict[str, Any]) -> ModelIO:
    """The inputs a report row's model takes (rows written before the inputs spec: one float tensor)."""
    if row.get("inputs"):
        return ModelIO.model_validate({"inputs": row["inputs"]})
    return ModelIO.single(list(row["input_shape"]))


def caller(fmt: str, folder: Path, files: list[str], batch: int, io: ModelIO,
           threads: int) -> Callable[[], Any] | None:
    """A zero-argument call running one inference of the row's file at `batch`; None if it cannot run that batch."""
    if fmt == "torch":
        from compresspipe.artifacts.model import load_model
        from compresspipe.runtimes.job import input_dtype

        module = load_model(folder).module.eval()
        x = example(io, batch, float_dtype=input_dtype(module))

        def run_torch() -> Any:
            with torch.inference_mode():
                return forward(module, x)

        return run_torch
    if fmt in ("onnx", "onnx_int8", "onnx_int4"):
        from compresspipe.runtimes.onnx_float import feed_types, session

        sess = session(folder / files[0], threads)
        from compresspipe.runtimes.kv_cache import DecodeStep, KVSession

        if isinstance(sess, KVSession):  # a language model that generates: time what it repeats per token
            return DecodeStep(sess.raw, batch)
        names, dtypes = feed_types(sess)
        feed = numpy_feed(example(io, batch), names, dtypes)
        return lambda: sess.run(None, feed)
    if fmt in ("executorch", "executorch_int8"):
        if batch != 1:
            return None  # the programs are lowered for batch 1
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(folder / files[0]).load_method("forward")
        x = example(io, 1)
        values = [x[n] for n in io.names] if isinstance(x, dict) else [x]
        return lambda: method.execute(values)
    raise ValueError(f"no runtime for format {fmt!r}")


def set_threads(threads: int, executorch: bool = False) -> int:
    """Pin torch's (and, when asked, ExecuTorch's) thread pools; returns torch's previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    if executorch:
        try:  # XNNPACK's pool; experimental API, so a failure leaves its default
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        except Exception:  # the API moved: the note in the report says "default threads"
            pass
    return previous


def interleaved(calls: dict[Hashable, Callable[[], Any]], rounds: int, warmup: int,
                max_iters: int, on_round: Callable[[], object] | None = None) -> dict[Hashable, list[float]]:
    """Per-round median milliseconds of each call; the calls take turns within every round."""
    iters: dict[Hashable, int] = {}
    for key, call in calls.items():
        for _ in range(max(1, warmup)):
            call()
        t0 = time.perf_counter()
        call()
        once = max(time.perf_counter() - t0, 1e-7)
        iters[key] = int(min(max(1, max_iters), max(1, ROUND_BUDGET_S // once)))
    keys = list(calls)
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % max(len(keys), 1)
        for key in keys[shift:] + keys[:shift]:
            call, times = calls[key], []
            for _ in range(iters[key]):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            samples[key].append(statistics.median(times) * 1000.0)
        if on_round is not None:
            on_round()
    return samples


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value is all three."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def ratio(reference: list[float], row: list[float]) -> tuple[float, float, float]:
    """Speedup reference / row per round: (median, first quartile, third quartile)."""
    q1, med, q3 = quartiles([a / b for a, b in zip(reference, row, strict=True) if b > 0])
    return med, q1, q3
