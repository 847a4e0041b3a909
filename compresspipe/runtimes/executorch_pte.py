"""`executorch` / `executorch_int8`: a .pte program lowered to XNNPACK, run in ExecuTorch's own runtime.

ExecuTorch is PyTorch Mobile's successor. The program has a fixed batch of 1 (what a device runs; a
dynamic batch makes the runtime's memory plan bounded and brittle), so verification runs sample by
sample and latency is measured at batch 1 only. int8 uses torchao's PT2E flow with ExecuTorch's
XNNPACKQuantizer (symmetric int8, per-channel weights), calibrated on the calibration split.
Optional extra: pip install 'compresspipe[mobile]'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresspipe.models.inputs import args_and_kwargs, batch_len, forward, take
from compresspipe.runtimes.job import (
    Exporter,
    ExportJob,
    compare,
    dynamic_batch_shapes,
    int8_settings,
    per_sample,
    time_batches,
    warnings_as_notes,
)

INSTALL = "pip install 'compresspipe[mobile]'"


def available() -> str | None:
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as exc:
        return f"executorch cannot be imported ({exc}); {INSTALL}"
    return None


def available_int8() -> str | None:
    reason = available()
    if reason:
        return reason
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError as exc:
        return f"torchao cannot be imported ({exc}); pip install 'compresspipe[torchao]'"
    return None


def _lower(program: torch.export.ExportedProgram, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    executable = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(executable.buffer)
    tmp.replace(path)


def export_float(job: ExportJob, folder: Path) -> list[Path]:
    if any(e.get("kind") == "quantize" for e in job.state.edits):
        job.notes.append("model.pte: the quantize stage's layers run their reference arithmetic (int8 weights "
                         "dequantized in the program, activations rounded to the calibrated grid) on float "
                         "kernels; executorch_int8 runs XNNPACK's int8 kernels")
    path = folder / "model.pte"
    with warnings_as_notes(job, "executorch"):
        _lower(_export(job.module, job.example(1)), path)
    return [path]


def _export(module: nn.Module, example: Any, dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """torch.export with a tensor positionally or named tensors as keywords (the program then takes them in the
    inputs spec's order)."""
    args, kwargs = args_and_kwargs(example)
    return torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes)


def _quantized(job: ExportJob) -> nn.Module:
    """PT2E: capture, insert XNNPACK observers, calibrate, convert to quantize/dequantize pairs."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    cfg = int8_settings(job)
    source = job.float_module if job.float_module is not None else job.module  # after a quantize stage: its float input
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=cfg.per_channel))
    try:  # calibrate whole batches when the graph allows a free batch dimension
        captured = _export(source, job.example(2), dynamic_batch_shapes(job, batch=True, infer_ranges=True)).module()
        batched = True
    except Exception:
        captured = _export(source, job.example(1)).module()
        batched = False
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for x in job.calibration(cfg.batch_size, cfg.calibration_batches):
            for chunk in ([x] if batched else [take(x, slice(i, i + 1)) for i in range(batch_len(x))]):
                forward(prepared, chunk)
    return convert_pt2e(prepared)


def export_int8(job: ExportJob, folder: Path) -> list[Path]:
    path = folder / "model.int8.pte"
    with warnings_as_notes(job, "executorch_int8"):
        converted = _quantized(job)
        _lower(_export(converted, job.example(1)), path)
    cfg = int8_settings(job)
    job.notes.append(f"model.int8.pte: XNNPACK int8 (PT2E, {cfg.calibration_batches} calibration "
                     f"batches of {cfg.batch_size})")
    return [path]


def verify(files: list[Path], job: ExportJob) -> dict[str, Any]:
    """Load the .pte in ExecuTorch's runtime; compare sample by sample; time batch 1."""
    from executorch.runtime import Runtime

    threads = job.latency.threads if job.latency is not None else 1
    note = ""
    try:  # XNNPACK's thread pool; experimental API, so a failure only changes the note
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    except Exception:
        note = ", default threads"
    method = Runtime.get().load_program(files[0]).load_method("forward")

    def run(x: Any) -> torch.Tensor:
        values = [x[n] for n in job.input_names] if isinstance(x, dict) else [x]
        return method.execute([v.contiguous() for v in values])[0]

    metrics = compare(job, per_sample(run))
    metrics["latency_ms"] = time_batches(job, run, [1])
    metrics["runtime"] = f"executorch xnnpack ({threads} thread{'s' if threads != 1 else ''}{note}), batch 1"
    return metrics


_SNIPPET = ("from executorch.runtime import Runtime; m = Runtime.get().load_program('{file}').load_method('forward')",
            "logits = m.execute([x])[0]  # x: torch tensor, batch 1")

EXPORTERS = {
    "executorch": Exporter("executorch", "model.pte", available, export_float, verify, fixed_batch=True,
                           load_snippet=(_SNIPPET[0].format(file="model.pte"), _SNIPPET[1])),
    "executorch_int8": Exporter("executorch_int8", "model.int8.pte", available_int8, export_int8, verify, int8=True,
                                fixed_batch=True,
                                load_snippet=(_SNIPPET[0].format(file="model.int8.pte"), _SNIPPET[1])),
}
