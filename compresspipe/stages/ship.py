"""The file a report row ships, built with the export stage's format modules and checked in its runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresspipe.artifacts.model import MODEL_FILE, WEIGHTS_FILE
from compresspipe.errors import StageError
from compresspipe.recipe.spec import RUNTIME_FORMATS

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.recipe.spec import Recipe
    from compresspipe.stages.context import StageContext
    from compresspipe.stages.export import ExportConfig

DEPLOY_FOLDER = "deploy"


def is_int8(state: ModelState) -> bool:
    """Whether a quantize stage made this model int8 (the runtime then ships its int8 file)."""
    from compresspipe.stages.quantize import QuantizeRecord

    record = state.get(QuantizeRecord)
    return record is not None and record.int8


def primary_format(runtime: str, state: ModelState, exported: dict[str, list[str]]) -> str:
    """The format a row ships in `runtime`: int8 after a quantize stage or when the stage exported it; in ONNX
    Runtime, the 4-bit MatMulNBits file after int4 weight-only quantization."""
    from compresspipe.stages.quantize import QuantizeRecord

    float_fmt, int8_fmt = RUNTIME_FORMATS[runtime]
    record = state.get(QuantizeRecord)
    if runtime == "onnxruntime" and (record is not None and record.onnx_int4 is not None or "onnx_int4" in exported):
        return "onnx_int4"
    return int8_fmt if is_int8(state) or int8_fmt in exported else float_fmt


def export_config(recipe: Recipe, fmt: str) -> ExportConfig:
    """The recipe's export settings (opset, int8 calibration, ...) for one format; defaults without an export stage.

    Deploy files always take any batch size (so every deploy batch size can be timed; ExecuTorch is batch 1).
    """
    from compresspipe.stages.export import ExportConfig

    base = next((s for s in recipe.stages if s.type == "export"), None)
    data: dict[str, Any] = base.model_dump(exclude={"name", "expect"}) if base is not None else {"type": "export"}
    data.update(formats=[fmt], sparse=False, dynamic_batch=True)
    return ExportConfig.model_validate(data)


def ship(fmt: str, state: ModelState, ctx: StageContext, folder: Path, exported: dict[str, list[str]],
         torch_metrics: dict[str, Any]) -> dict[str, Any]:
    """Build (or reuse) the row's `fmt` file under `folder` and measure it on the whole validation split.

    Returns the row's `formats[fmt]` entry: files (relative to `folder`), bytes, the task's metrics (accuracy,
    loss, `metric` and its `score`, every metric under `metrics`), agreement with
    the PyTorch model, max |logit difference|, notes, and for int8 ONNX the CPUs it is exact on.
    """
    from compresspipe.runtimes.job import compare, fidelity, torch_runner
    from compresspipe.stages.export.stage import build_job, exporter, int8_record

    if fmt == "torch":
        files = [WEIGHTS_FILE, MODEL_FILE]
        entry: dict[str, Any] = {"format": "torch", "files": files, "bytes": sum((folder / f).stat().st_size for f in files),
                 **{k: torch_metrics.get(k) for k in ("accuracy", "loss", "metric", "score", "metrics")},
                 "agreement": 1.0, "max_abs_diff": 0.0, "notes": []}
        if is_int8(state):  # the int8 emulation against the float model it quantizes
            job = build_job(export_config(ctx.recipe, "onnx_int8"), state, ctx, ["onnx_int8"], None, None)
            entry["fidelity"] = fidelity(compare(job, torch_runner(job.module)), job, int8=True)
        else:
            entry["fidelity"] = {"source": "pytorch model", "agreement": 1.0, "drop": 0.0, "passed": True,
                                 "failures": []}
        _fidelity_note(entry)
        return entry

    ex = exporter(fmt)
    reason = ex.available()
    if reason:
        raise StageError(ctx.name, f"cannot measure the {fmt} file: {reason}")
    job = build_job(export_config(ctx.recipe, fmt), state, ctx, [fmt], None, None)
    try:
        if fmt in exported:
            paths = [folder / f for f in exported[fmt]]
        else:
            (folder / DEPLOY_FOLDER).mkdir(parents=True, exist_ok=True)
            paths = ex.export(job, folder / DEPLOY_FOLDER)
        metrics = ex.verify(paths, job)
    except Exception as exc:  # the exporters and runtimes raise many types
        raise StageError(ctx.name, f"cannot build or run its {fmt} file for deploy: {type(exc).__name__}: "
                                   f"{str(exc).strip()[:400]}. Measure the PyTorch model instead with "
                                   "deploy.runtime: torch") from exc
    entry = {
        "format": fmt, "files": [p.relative_to(folder).as_posix() for p in paths],
        "bytes": sum(p.stat().st_size for p in paths),
        **{k: metrics.get(k) for k in ("accuracy", "loss", "metric", "score", "metrics")},
        "agreement": metrics["top1_agreement"],
        "max_abs_diff": metrics["max_abs_diff"],
        # a file the stage exported was verified there, and its notes are the stage's: measuring it again for the
        # deploy figures repeats them (the greedy-decoding line of an LM's file, with other timings)
        "notes": [] if fmt in exported else [n for n in job.notes if not n.startswith("model.onnx:")],
    }
    if fmt == "onnx_int8":
        entry["int8"] = int8_record(paths[0], job)
    entry["fidelity"] = metrics.get("fidelity") or fidelity(metrics, job, int8=ex.int8)
    if fmt == "onnx_int8":
        from compresspipe.runtimes.onnx_int8 import diagnosis_of, float_layers_of

        job.float_layers = job.float_layers or float_layers_of(paths[0])
        if not job.diagnosis and job.stability is None and not entry["fidelity"]["passed"]:
            recorded = diagnosis_of(paths[0])  # a file an earlier step wrote (the export stage's own)
            job.diagnosis = list(recorded.get("diverging") or [])
            job.stability = recorded.get("stability")
    if job.float_layers:
        entry["fidelity"]["float_layers"] = list(job.float_layers)
    if job.diagnosis:
        entry["fidelity"]["diverging"] = list(job.diagnosis)
    if job.stability and not entry["fidelity"]["passed"]:
        entry["fidelity"]["stability"] = dict(job.stability)
        cause = unstable_cause(job.stability)
        if cause:
            entry["fidelity"]["cause"] = cause
    _fidelity_note(entry)
    if fmt == "onnx_int4" and not entry["fidelity"]["passed"]:
        from compresspipe.runtimes.kv_cache import language_model
        from compresspipe.stages.quantize.nbits import QuantMatMulNBits
        from compresspipe.stages.quantize.stage import output_layer

        head = output_layer(job.module)  # 4-bit in PyTorch is 4-bit in the file (the writer follows the stage)
        four_bit = head is not None and isinstance(job.module.get_submodule(head), QuantMatMulNBits)
        hint = head_hint(language_model(job.module, job.io.task) is not None, not four_bit)
        entry["notes"] += [hint] if hint else []
    return entry


def head_hint(language_model: bool, head_float: bool) -> str | None:
    """What to try when a language model's int4 file does not follow its source and its head is 4-bit too."""
    if not language_model or head_float:
        return None
    return ("onnx_int4: the language model head is 4-bit too; quantize.head: float keeps it float (it picks every "
            "next token; a head tied to the embedding adds no bytes)")


def unstable_cause(stability: dict[str, Any]) -> str | None:
    """The cause a failed fidelity gate names when the float model itself does not hold its top-1 under noise of
    int8's size (ExportJob.stability): then the model, not the quantizer, is what to change."""
    limit = stability.get("min_agreement", 0.99)
    what = {"weights": "random weight noise of int8 rounding's size", "input": "input noise of half an int8 step"}
    low = [f"{stability[k]:.4f} under {text}" for k, text in what.items()
           if isinstance(stability.get(k), float) and stability[k] < limit]
    if not low:
        return None
    return (f"the float model itself keeps only {' and '.join(low)} (the share of its top-1 predictions): no int8 "
            f"file on this grid can follow it (make the model less sensitive: train longer, weight decay, label "
            f"smoothing; or ship the float file)")


def _fidelity_note(entry: dict[str, Any]) -> None:
    """The row's note on a file that fails the gate. `fidelity.cause` is left to the gate's description: the int8
    file's own note already gives the stability figures it comes from."""
    fid = entry["fidelity"]
    if not fid["passed"]:
        worst = ", ".join(f"{d['layer']} ({d['cause']})" for d in fid.get("diverging", [])[:3])
        entry["notes"].append(f"{entry['format']} does not follow its source: {'; '.join(fid['failures'])} "
                              f"(deploy.fidelity)" + (f"; most diverging layers: {worst}" if worst else ""))
