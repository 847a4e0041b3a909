"""`torch_export`: a torch.export program in its own archive format (.pt2), loaded without unpickling code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compresspipe.models.inputs import args_and_kwargs
from compresspipe.runtimes.job import (
    Exporter,
    ExportJob,
    always,
    compare,
    dynamic_batch_shapes,
    per_sample,
    time_batches,
    torch_runner,
    torch_threads,
    warnings_as_notes,
)


def export(job: ExportJob, folder: Path) -> list[Path]:
    path = folder / "model.pt2"
    example = job.example(2 if job.config.dynamic_batch else 1)
    with warnings_as_notes(job, "torch_export"):
        args, kwargs = args_and_kwargs(example)
        program = torch.export.export(job.module, args, kwargs=kwargs or None,
                                      dynamic_shapes=dynamic_batch_shapes(job, infer_ranges=True))
        tmp = path.with_name(f".tmp-{path.name}")  # torch.export.save wants a .pt2 name
        torch.export.save(program, str(tmp))
    tmp.replace(path)
    return [path]


def verify(files: list[Path], job: ExportJob) -> dict[str, Any]:
    with warnings_as_notes(job, "torch_export (load)"):
        module = torch.export.load(str(files[0])).module()
    run = torch_runner(module)
    metrics = compare(job, run if job.config.dynamic_batch else per_sample(run))
    threads = job.latency.threads if job.latency is not None else None
    with torch_threads(threads):
        metrics["latency_ms"] = time_batches(job, run, None if job.config.dynamic_batch else [1])
    metrics["runtime"] = "torch (eager, ExportedProgram.module())"
    return metrics


EXPORTERS = {
    "torch_export": Exporter(
        "torch_export", "model.pt2", always, export, verify,
        load_snippet=("import torch; program = torch.export.load('model.pt2')", "logits = program.module()(x)"),
    ),
}
