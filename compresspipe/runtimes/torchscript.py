"""`torchscript`: torch.jit.trace + save, for runtimes that still read TorchScript.

Deprecated in torch 2.14 (PyTorch Mobile's format); offered because it is cheap. Prefer `executorch`
for mobile and `torch_export` for servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compresspipe.runtimes.job import (
    Exporter,
    ExportJob,
    always,
    compare,
    time_batches,
    torch_runner,
    torch_threads,
    warnings_as_notes,
)


def export(job: ExportJob, folder: Path) -> list[Path]:
    path = folder / "model.torchscript.pt"
    with warnings_as_notes(job, "torchscript"):
        example = job.example(2)
        if isinstance(example, dict):  # named inputs: traced as keywords, called as keywords
            traced = torch.jit.trace(job.module, example_kwarg_inputs=example, check_trace=False)
        else:
            traced = torch.jit.trace(job.module, (example,), check_trace=False)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.jit.save(traced, str(tmp))
    tmp.replace(path)
    job.notes.append("model.torchscript.pt: TorchScript is deprecated in torch 2.14; prefer executorch "
                     "(mobile) or torch_export")
    return [path]


def verify(files: list[Path], job: ExportJob) -> dict[str, Any]:
    with warnings_as_notes(job, "torchscript (load)"):
        module = torch.jit.load(str(files[0]), map_location="cpu")
    run = torch_runner(module)
    metrics = compare(job, run)
    with torch_threads(job.latency.threads if job.latency is not None else None):
        metrics["latency_ms"] = time_batches(job, run)
    metrics["runtime"] = "torch.jit"
    return metrics


EXPORTERS = {
    "torchscript": Exporter(
        "torchscript", "model.torchscript.pt", always, export, verify,
        load_snippet=("import torch; model = torch.jit.load('model.torchscript.pt')", "logits = model(x)"),
    ),
}
