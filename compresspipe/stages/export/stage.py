"""The export stage: write each format, verify it in its runtime, write export/manifest.json.

The model passes through unchanged (kind "export"). A verification outside tolerance fails the stage
(exit 3) after every format was tried and the manifest written, so the files stay for inspection.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compresspipe.engine.fsutil import atomic_write_json, sha256_file
from compresspipe.errors import StageConfigError, StageError
from compresspipe.stages.base import Stage, StagePlan, StageResult
from compresspipe.stages.export import FORMAT_MODULES, FORMAT_ORDER, ExportConfig
from compresspipe.stages.export.job import Exporter, ExportJob, dtype_label, input_dtype, torch_runner

if TYPE_CHECKING:
    from compresspipe.engine.artifacts import ModelState
    from compresspipe.engine.context import StageContext

MANIFEST_FORMAT = "compresspipe.export"
MANIFEST_VERSION = 1
EXPORT_FOLDER = "export"
SPARSE_FORMAT = "safetensors_zip"
FORMAT_MODULES_ALL = {**FORMAT_MODULES, SPARSE_FORMAT: "compresspipe.stages.export.safetensors_copy"}
# Formats that do not trace the torch module, so they work whatever its layers are.
NO_TRACE = frozenset({"safetensors", SPARSE_FORMAT, "onnx_int8"})


def exporter(fmt: str) -> Exporter:
    return importlib.import_module(FORMAT_MODULES_ALL[fmt]).EXPORTERS[fmt]


def recorded_layers(module: nn.Module, record: dict[str, Any]) -> dict[str, list[str]]:
    """Layer type -> names of the layers a quantize stage listed as quantized (record.onnx_int8.layers)."""
    found: dict[str, list[str]] = {}
    names = (record.get("onnx_int8") or {}).get("layers") or []
    for name in names if isinstance(names, list) else []:
        try:
            layer = module.get_submodule(str(name))
        except AttributeError:
            continue
        found.setdefault(type(layer).__name__, []).append(str(name))
    return found


def export_records(ctx: StageContext) -> list[tuple[str, dict[str, Any]]]:
    """Earlier stages' details.export (what a quantize stage asks of the export), latest first."""
    found = []
    for name, record in reversed(list(ctx.history.items())):
        export = ((record.metrics or {}).get("details") or {}).get("export")
        if isinstance(export, dict):
            found.append((name, export))
    return found


def find_handoff(ctx: StageContext) -> tuple[str, dict[str, Any]] | None:
    """The latest earlier stage that recorded details.export.onnx_int8: how to quantize the ONNX graph."""
    for name, export in export_records(ctx):
        if isinstance(export.get("onnx_int8"), dict):
            return name, export["onnx_int8"]
    return None


class ExportStage(Stage[ExportConfig]):
    requires = frozenset({"calibration_data"})

    def formats(self) -> list[str]:
        wanted = set(self.config.formats) | ({SPARSE_FORMAT} if self.config.sparse else set())
        return [f for f in (*FORMAT_ORDER, SPARSE_FORMAT) if f in wanted]

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        return StagePlan(notes=[f"writes {', '.join(self.formats())} into {EXPORT_FOLDER}/; model unchanged"])

    # -- the run ------------------------------------------------------------------------------------

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        formats = self.formats()
        for fmt in formats:
            reason = exporter(fmt).available()
            if reason:
                raise StageConfigError(ctx.name, f"format {fmt!r} cannot run here: {reason}")
        module = state.module.eval().to("cpu")
        float_module, handoff = self._float_source(module, formats, ctx)
        job = self._job(state, module, ctx, handoff, float_module)
        folder = ctx.stage_dir / EXPORT_FOLDER
        folder.mkdir(parents=True, exist_ok=True)

        rows, entries, failures = [], [], []
        sizes = [str(b) for b in job.latency.batch_sizes] if job.latency is not None else []
        for fmt in formats:
            ex = exporter(fmt)
            files: list[Path] = []
            try:
                with ctx.ui.progress(f"export {fmt}", None):
                    files = ex.export(job, folder)
                    metrics = ex.verify(files, job)
            except Exception as exc:  # keep going: every format gets its verdict, then the stage fails
                metrics = {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
            verdict = self._judge(fmt, ex, metrics, job)
            if verdict != "pass":
                failures.append(f"{fmt}: {verdict}")
            rows.append(self._row(fmt, files, folder, metrics, verdict, sizes))
            entries += [self._entry(fmt, ex, f, folder, state, ctx) for f in files]
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": state.source,
                    "edits": len(state.edits), "files": entries, "checks": rows}
        atomic_write_json(folder / "manifest.json", manifest)
        if failures:
            raise StageError(ctx.name, "export verification failed: " + "; ".join(failures)
                             + f". The files are kept for inspection in {folder} (the next run into this "
                             "folder removes them)")
        notes = list(job.notes) + [f"{len(entries)} files verified in {', '.join(formats)}; "
                                   f"see {EXPORT_FOLDER}/manifest.json"]
        if entries and entries[0].get("preprocessing"):
            notes.append(f"inputs the files expect: {entries[0]['preprocessing']}")
        return StageResult(state=state, kind="export", notes=notes,
                           details={"tables": {"exports": rows, "files": [self._file_row(e) for e in entries]},
                                    "manifest": f"{EXPORT_FOLDER}/manifest.json",
                                    **({"handoff": handoff} if handoff else {})})

    # -- pieces ---------------------------------------------------------------------------------------

    def _float_source(self, module: nn.Module, formats: list[str], ctx: StageContext,
                      ) -> tuple[nn.Module | None, dict[str, Any] | None]:
        """(float model to quantize for onnx_int8 if `module` cannot be traced, the quantize stage's record)."""
        found = find_handoff(ctx)
        handoff = found[1] if found else None
        bad: dict[str, list[str]] = {}
        records = export_records(ctx)
        if not bad and records and records[0][1].get("module_exportable") is False:
            bad = recorded_layers(module, records[0][1]) or {f"layers of stage '{records[0][0]}'": ["(all)"]}
        if not bad:
            if {"onnx_int8", "executorch_int8"} & set(formats) and handoff and handoff.get("float_stage"):
                return ctx.load_stage(str(handoff["float_stage"])).module.eval().to("cpu"), handoff
            return None, handoff
        kinds = ", ".join(f"{k} ({', '.join(v[:3])}{' ...' if len(v) > 3 else ''})" for k, v in bad.items())
        traced = [f for f in formats if f not in NO_TRACE]
        if traced:
            raise StageConfigError(
                ctx.name, f"formats {traced} need a traceable model, but it holds torch quantized layers that no "
                f"exporter can trace: {kinds}. Export with formats: [onnx_int8, safetensors] (ONNX Runtime "
                "quantizes the float model from before the quantize stage), or quantize with a backend "
                "whose layers export")
        if "onnx_int8" not in formats:
            return None, handoff
        if found is None:
            raise StageConfigError(
                ctx.name, f"onnx_int8 needs the float model before quantization, but no earlier stage recorded "
                f"one (details.export.onnx_int8) and the current model holds {kinds}")
        qname, record = found
        names = list(ctx.history)
        float_name = record.get("float_stage") or names[max(names.index(qname) - 1, 0)]
        float_state = ctx.load_stage(str(float_name))
        return float_state.module.eval().to("cpu"), handoff

    def _job(self, state: ModelState, module: nn.Module, ctx: StageContext, handoff: dict[str, Any] | None,
             float_module: nn.Module | None) -> ExportJob:
        cfg = self.config
        dtype = input_dtype(module)
        batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (x, y) in enumerate(ctx.data.loader("val", ctx.recipe.data.eval_batch_size)):
            if i >= cfg.verify.batches:
                break
            batches.append((x.to(dtype), y))
        run = torch_runner(module)
        reference = [run(x).detach() for x, _ in batches]

        def calibration(batch_size: int, count: int):
            for i, (x, _) in enumerate(ctx.data.loader("calibration", batch_size)):
                if i >= count:
                    break
                yield x.to(dtype)

        latency = ctx.recipe.evaluate.latency
        return ExportJob(cfg, state, module, ctx.name, batches, reference, calibration,
                         latency if latency.enabled else None, handoff, float_module)

    def _judge(self, fmt: str, ex: Exporter, metrics: dict[str, Any], job: ExportJob) -> str:
        if "error" in metrics:
            return f"could not export or run: {metrics['error']}"
        v = job.config.verify
        # a model holding int8 layers runs other int8 kernels in another runtime: rounding differs by design
        quantized = any(e.get("kind") == "quantize" for e in job.state.edits)
        exact_runtime = fmt == "safetensors"  # a .pt2 runs the layers' reference math, not the int8 kernels
        if ex.int8 or job.dtype in (torch.float16, torch.bfloat16) or (quantized and not exact_runtime):
            if metrics["top1_agreement"] < v.min_agreement:
                return (f"top-1 agreement with PyTorch {metrics['top1_agreement']:.4f} < "
                        f"verify.min_agreement {v.min_agreement}")
            return "pass"
        if not metrics["max_abs_diff"] <= v.atol:  # also catches NaN
            return f"max |diff| from PyTorch {metrics['max_abs_diff']:.3g} > verify.atol {v.atol:g}"
        return "pass"

    @staticmethod
    def _row(fmt: str, files: list[Path], folder: Path, metrics: dict[str, Any], verdict: str,
             sizes: list[str]) -> dict[str, Any]:
        lat = metrics.get("latency_ms") or {}
        row: dict[str, Any] = {
            "format": fmt,
            "file": ", ".join(f.relative_to(folder).as_posix() for f in files),
            "bytes": sum(f.stat().st_size for f in files if f.exists()),
            "max_abs_diff": metrics.get("max_abs_diff"),
            "top1_agreement": metrics.get("top1_agreement"),
            "accuracy": metrics.get("accuracy"),
            "samples": metrics.get("samples"),
        }
        row.update({f"latency b{bs} ms": lat.get(bs) for bs in sizes})
        row["runtime"] = metrics.get("runtime")
        row["check"] = verdict
        return row

    @staticmethod
    def _file_row(entry: dict[str, Any]) -> dict[str, Any]:
        """The manifest entry as a report.md row (sha256 shortened; the full one is in manifest.json)."""
        return {"file": entry["file"], "format": entry["format"], "bytes": entry["bytes"],
                "sha256": entry["sha256"][:12], "input": f"{entry['input']['shape']} {entry['input']['dtype']}",
                "how to load": "; ".join(entry["how_to_load"])}

    def _entry(self, fmt: str, ex: Exporter, path: Path, folder: Path, state: ModelState,
               ctx: StageContext) -> dict[str, Any]:
        data = ctx.recipe.data
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        fixed = ex.fixed_batch or (not self.config.dynamic_batch and fmt.startswith(("onnx", "torch_export")))
        batch: str | int = 1 if fixed else "batch"
        dtype = dtype_label(input_dtype(state.module))
        return {
            "file": path.relative_to(folder).as_posix(),
            "format": fmt,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "input": {"name": "input", "shape": [batch, *state.input_shape], "dtype": dtype},
            "output": {"name": "logits", "shape": [batch, state.num_classes]},
            "normalisation": {"mean": mean, "std": std} if mean is not None and std is not None else None,
            "preprocessing": getattr(data, "preprocessing", None),
            "num_classes": state.num_classes,
            "how_to_load": list(ex.load_snippet),
        }
