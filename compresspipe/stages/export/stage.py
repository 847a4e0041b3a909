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

from compresspipe.artifacts.files import atomic_write_json, sha256_file
from compresspipe.errors import StageConfigError, StageError
from compresspipe.models.inputs import float_to
from compresspipe.runtimes.job import (
    Exporter,
    ExportJob,
    dtype_label,
    fidelity,
    input_dtype,
    torch_runner,
)
from compresspipe.stages.base import Need, Stage, StagePlan, StageResult
from compresspipe.stages.export import FORMAT_MODULES, FORMAT_ORDER, ExportConfig
from compresspipe.stages.quantize import OnnxInt8Handoff, QuantizeRecord

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.recipe.spec import LatencySpec
    from compresspipe.stages.context import StageContext

MANIFEST_FORMAT = "compresspipe.export"
MANIFEST_VERSION = 1
EXPORT_FOLDER = "export"
SPARSE_FORMAT = "safetensors_zip"
FORMAT_MODULES_ALL = {**FORMAT_MODULES, SPARSE_FORMAT: "compresspipe.runtimes.safetensors_copy"}
def output_shape(io: Any, batch: str | int, fixed: bool, classes: int | None) -> list[Any]:
    """The logits' shape: [batch, classes], or [batch, positions, classes] for per-token tasks."""
    from compresspipe.metrics.tasks import TASKS

    if not TASKS[io.task].per_position:
        return [batch, classes]
    first = io.inputs[0]
    positions: str | int = first.shape[0] if fixed or 0 not in first.dynamic else first.dynamic[0]
    return [batch, positions, classes]


def exporter(fmt: str) -> Exporter:
    return importlib.import_module(FORMAT_MODULES_ALL[fmt]).EXPORTERS[fmt]


def float_source(state: ModelState, formats: list[str], ctx: StageContext,
                 ) -> tuple[nn.Module | None, OnnxInt8Handoff | None]:
    """(the float model an int8 format quantizes instead of the quantized one, the quantize stage's settings).

    After a quantize stage, onnx_int8 and executorch_int8 quantize the float model from before it (ONNX
    Runtime and XNNPACK calibrate their own int8 graphs) with the settings that stage recorded.
    """
    record = state.get(QuantizeRecord)
    if record is None:
        return None, None
    if {"onnx_int8", "onnx_int4", "executorch_int8"} & set(formats):
        if record.float_stage is not None:
            return ctx.load_stage(record.float_stage).module.eval().to("cpu"), record.onnx_int8
        if record.int8:  # qat: the weights were trained for int8, so quantize them, dequantized, not the old ones
            from compresspipe.stages.quantize.layers import dequantized

            return dequantized(state.module.to("cpu")), record.onnx_int8
    return None, record.onnx_int8


def build_job(config: ExportConfig, state: ModelState, ctx: StageContext, formats: list[str],
              verify_batches: int | None, latency: LatencySpec | None) -> ExportJob:
    """Everything a format module needs: the model (and its float source for int8), verification batches
    (`verify_batches` of the validation split, None: all of it) with PyTorch's answers, calibration data,
    and the CPU target int8 files must be correct on."""
    from compresspipe.recipe.spec import named_metrics
    from compresspipe.runtimes.cpu import resolve

    module = state.module.eval().to("cpu")
    float_module, handoff = float_source(state, formats, ctx)
    # one typed source for the int8 files' settings: the quantize stage's, else the export block's (its file
    # options, float_small_convs and float_output, apply either way)
    files = {"float_small_convs": config.int8.float_small_convs, "float_output": config.int8.float_output}
    handoff = handoff.model_copy(update=files) if handoff is not None else config.int8.handoff(ctx.recipe.data.eval_batch_size)
    dtype = input_dtype(module)
    batches = [(float_to(x, dtype), y) for x, y in ctx.batches("val", verify_batches)]
    run = torch_runner(module)
    reference = [run(x).detach() for x, _ in batches]
    float_reference = None
    if float_module is not None:  # int8 files are judged against the float model they quantize
        source = torch_runner(float_module)
        float_reference = [source(x).detach() for x, _ in batches]

    def calibration(batch_size: int, count: int):
        for x, _ in ctx.batches("calibration", count, batch_size):
            yield float_to(x, dtype)

    tokenizer = None
    if getattr(ctx.recipe.data, "dataset", None) == "text":
        from compresspipe.data.text import tokenizer as text_tokenizer

        def tokenizer() -> Any:
            return text_tokenizer(ctx.recipe.data, ctx.recipe.seed)  # type: ignore[arg-type]

    return ExportJob(config, state, module, ctx.name, batches, reference, calibration, latency, handoff,
                     float_module, cpu=resolve(ctx.recipe.deploy.cpu), ui=ctx.ui, num_classes=ctx.data.num_classes,
                     metrics=named_metrics(ctx.recipe), float_reference=float_reference,
                     fidelity=ctx.recipe.deploy.fidelity, tokenizer=tokenizer)


def int8_record(path: Path, job: ExportJob) -> dict[str, Any]:
    """Which CPUs an int8 ONNX file is exact on, and the machine that verified it (the manifest's `int8`)."""
    from compresspipe.runtimes.cpu import WEIGHT_BITS, correct_on, machine_record
    from compresspipe.runtimes.onnx_int8 import weight_abs_max

    widest = weight_abs_max(path)
    return {"cpu_target": job.cpu, "weight_bits": WEIGHT_BITS[job.cpu], "weight_abs_max": widest,
            "correct_on": correct_on(widest or 0), "verified_on": machine_record()}


class ExportStage(Stage[ExportConfig]):
    def needs(self) -> list[Need]:
        int8 = [f for f in self.config.formats if f in ("onnx_int8", "executorch_int8")]
        return [Need("calibration_data", why=f"formats {', '.join(int8)}")] if int8 else []

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
        job = build_job(self.config, state, ctx, formats, self.config.verify.batches,
                        ctx.recipe.evaluate.latency if ctx.recipe.evaluate.latency.enabled else None)
        handoff = job.handoff
        folder = ctx.stage_dir / EXPORT_FOLDER
        folder.mkdir(parents=True, exist_ok=True)

        rows: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        failures: list[str] = []
        written: dict[str, list[str]] = {}
        sizes = [str(b) for b in job.latency.batch_sizes] if job.latency is not None else []
        with ctx.ui.progress(f"{ctx.name}: exporting", len(formats)) as bar:
            for fmt in formats:
                ex = exporter(fmt)
                files: list[Path] = []
                bar.update(info=f"{fmt}: writing")
                try:
                    files = ex.export(job, folder)
                    bar.update(info=f"{fmt}: verifying in its runtime")
                    metrics = ex.verify(files, job)
                except Exception as exc:  # keep going: every format gets its verdict, then the stage fails
                    metrics = {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
                bar.advance(1, info=fmt)
                self._record(fmt, ex, files, folder, metrics, job, ctx, state, rows, entries, failures, written,
                             sizes)
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": state.source,
                    "edits": len(state.edits), "files": entries, "checks": rows}
        atomic_write_json(folder / "manifest.json", manifest)
        if failures:
            raise StageError(ctx.name, "export verification failed: " + "; ".join(failures)
                             + f". The files are kept for inspection in {folder} (the next run into this "
                             "folder removes them)")
        notes = list(job.notes) + [f"{len(entries)} files verified in {', '.join(formats)}; "
                                   f"see {EXPORT_FOLDER}/manifest.json"]
        for entry in entries:
            if "int8" in entry and not entry["int8"]["correct_on"].startswith("every CPU"):
                notes.append(f"{entry['file']} is correct only on {entry['int8']['correct_on']}")
        if entries and entries[0].get("preprocessing"):
            notes.append(f"inputs the files expect: {entries[0]['preprocessing']}")
        return StageResult(state=state, kind="export", notes=notes, files=written,
                           details={"tables": {"exports": rows, "files": [self._file_row(e) for e in entries]},
                                    "manifest": f"{EXPORT_FOLDER}/manifest.json",
                                    **({"handoff": handoff.model_dump()} if handoff else {})})

    # -- pieces ---------------------------------------------------------------------------------------

    def _record(self, fmt: str, ex: Exporter, files: list[Path], folder: Path, metrics: dict[str, Any],
                job: ExportJob, ctx: StageContext, state: ModelState, rows: list, entries: list, failures: list,
                written: dict[str, list[str]], sizes: list[str]) -> None:
        """One format's verdict, table row, manifest entries and written files."""
        verdict = self._judge(fmt, ex, metrics, job)
        if ex.int8 and "error" not in metrics:
            # judged against the float model it quantizes; below deploy.fidelity the run's fidelity gate fails
            # (exit 1, every file kept for inspection) rather than this stage
            metrics["fidelity"] = fidelity(metrics, job, int8=True)
            verdict = "pass" if metrics["fidelity"]["passed"] else (
                "below deploy.fidelity: " + "; ".join(metrics["fidelity"]["failures"]))
        elif verdict != "pass":
            failures.append(f"{fmt}: {verdict}")
        rows.append(self._row(fmt, files, folder, metrics, verdict, sizes))
        written[fmt] = [f.relative_to(ctx.stage_dir).as_posix() for f in files]
        entries += [self._entry(fmt, ex, f, folder, state, ctx, job) for f in files]

    def _judge(self, fmt: str, ex: Exporter, metrics: dict[str, Any], job: ExportJob) -> str:
        if "error" in metrics:
            return f"could not export or run: {metrics['error']}"
        v = job.config.verify
        # a model holding int8 layers: torch and a .pt2 run the same float emulation; another runtime's float ops
        # may round an activation to the neighbouring int8 level, so those are judged by agreement
        quantized = any(e.get("kind") == "quantize" for e in job.state.edits)
        exact_runtime = fmt in ("safetensors", "torch_export")
        if ex.int8 or job.dtype in (torch.float16, torch.bfloat16) or (quantized and not exact_runtime):
            if metrics["top1_agreement"] >= v.min_agreement:
                return "pass"
            # a model with small margins flips many close calls under rounding: then the file must be as
            # accurate as the PyTorch model instead
            drop = metrics["pytorch_accuracy"] - metrics["accuracy"]
            if drop <= v.max_accuracy_drop + 1 / max(metrics["samples"], 1):  # one sample of slack
                return "pass"
            return (f"top-1 agreement with PyTorch {metrics['top1_agreement']:.4f} < verify.min_agreement "
                    f"{v.min_agreement}, and its accuracy is {100 * drop:.2f} points below PyTorch's "
                    f"(verify.max_accuracy_drop {v.max_accuracy_drop})")
        scale = float(metrics.get("max_abs_output") or 0.0)
        if not metrics["max_abs_diff"] <= v.atol + v.rtol * scale:  # also catches NaN
            return (f"max |diff| from PyTorch {metrics['max_abs_diff']:.3g} > verify.atol {v.atol:g} + verify.rtol "
                    f"{v.rtol:g} x the largest |output| {scale:.3g} (= {v.atol + v.rtol * scale:.3g})")
        gen = metrics.get("generation")
        if gen and gen["identical_sequences"] < gen["prompts"]:  # a float file must generate what PyTorch does
            return (f"greedy decoding through the key/value cache gives PyTorch's tokens for only "
                    f"{gen['identical_sequences']} of {gen['prompts']} prompts ({gen['matched_tokens']} of "
                    f"{gen['prompts'] * gen['tokens']} tokens)")
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
                "sha256": entry["sha256"][:12],
                "input": "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in entry["inputs"]),
                "how to load": "; ".join(entry["how_to_load"])}

    def _entry(self, fmt: str, ex: Exporter, path: Path, folder: Path, state: ModelState,
               ctx: StageContext, job: ExportJob) -> dict[str, Any]:
        io = state.spec
        prep = io.preprocessing or {}
        mean, std = prep.get("mean"), prep.get("std")
        fixed = ex.fixed_batch or (not self.config.dynamic_batch and fmt.startswith(("onnx", "torch_export")))
        batch: str | int = 1 if fixed else "batch"
        float_dtype = dtype_label(input_dtype(state.module))
        inputs = [{"name": i.name, "shape": [batch, *[d if fixed or a not in i.dynamic else i.dynamic[a]
                                                      for a, d in enumerate(i.shape)]],
                   "dtype": float_dtype if i.is_float else i.dtype} for i in io.inputs]
        return {
            "file": path.relative_to(folder).as_posix(),
            "format": fmt,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "input": inputs[0],
            "inputs": inputs,
            "output": {"name": "logits", "shape": output_shape(io, batch, fixed, state.num_classes)},
            "task": io.task,
            "classes": io.classes,
            "normalisation": {"mean": mean, "std": std} if mean is not None and std is not None else None,
            "preprocessing": prep.get("description") or getattr(ctx.recipe.data, "preprocessing", None),
            "resize": prep.get("resize"),
            "interpolation": prep.get("interpolation"),
            "num_classes": state.num_classes,
            "how_to_load": list(ex.load_snippet),
            **({"int8": int8_record(path, job)} if fmt == "onnx_int8" and path.suffix == ".onnx" else {}),
        }
