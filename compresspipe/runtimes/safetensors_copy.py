"""`safetensors`: weights + model.json (source and edit log), the same pair every stage folder holds.

Another program rebuilds the model from model.json: build `source` (a builtin or torchvision name with
kwargs), replay `edits` in order (resize: new tensor shapes/int attributes; replace: a submodule becomes
the torch.nn tree described; cast: dtype), then load model.safetensors strictly. With `sparse: true`
the pair is also stored as a deflate zip, which stores the zeros of unstructured sparsity almost for free.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

from compresspipe.artifacts.model import MODEL_FILE, WEIGHTS_FILE, load_model, save_model
from compresspipe.runtimes.job import (
    Exporter,
    ExportJob,
    always,
    compare,
    time_batches,
    torch_runner,
    torch_threads,
)

FOLDER = "safetensors"
ZIP_FILE = "model.zip"


def export(job: ExportJob, folder: Path) -> list[Path]:
    return save_model(job.state, folder / FOLDER)


def _verify_folder(path: Path, job: ExportJob, runtime: str) -> dict[str, Any]:
    module = load_model(path).module
    run = torch_runner(module)
    metrics = compare(job, run)
    with torch_threads(job.latency.threads if job.latency is not None else None):
        metrics["latency_ms"] = time_batches(job, run)
    metrics["runtime"] = runtime
    return metrics


def verify(files: list[Path], job: ExportJob) -> dict[str, Any]:
    return _verify_folder(files[0].parent, job, "torch (compresspipe.load_model)")


def export_zip(job: ExportJob, folder: Path) -> list[Path]:
    source = folder / FOLDER
    if not (source / WEIGHTS_FILE).is_file():
        save_model(job.state, source)
    path = folder / FOLDER / ZIP_FILE
    tmp = path.with_name(f".{ZIP_FILE}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name in (WEIGHTS_FILE, MODEL_FILE):
            archive.write(source / name, arcname=name)
    tmp.replace(path)
    return [path]


def verify_zip(files: list[Path], job: ExportJob) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="compresspipe-zip-") as tmp, zipfile.ZipFile(files[0]) as archive:
        archive.extractall(tmp)
        return _verify_folder(Path(tmp), job, "torch (unzip, compresspipe.load_model)")


EXPORTERS = {
    "safetensors": Exporter(
        "safetensors", f"{FOLDER}/{WEIGHTS_FILE}", always, export, verify,
        load_snippet=("from compresspipe.artifacts.model import load_model",
                      "model = load_model(Path('safetensors')).module  # model.json: source + edits"),
    ),
    "safetensors_zip": Exporter(
        "safetensors_zip", f"{FOLDER}/{ZIP_FILE}", always, export_zip, verify_zip,
        load_snippet=("zipfile.ZipFile('safetensors/model.zip').extractall('model')",
                      "model = compresspipe.artifacts.model.load_model(Path('model')).module"),
    ),
}
