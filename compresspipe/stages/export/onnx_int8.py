"""`onnx_int8`: ONNX Runtime quantization of the float ONNX graph.

Static QDQ (per-channel int8 weights, uint8 activations calibrated on the calibration split) for graphs
with convolutions; dynamic quantization for Linear/RNN-only graphs (ONNX Runtime's dynamic mode cannot
run Conv). This is also how a model whose torch quantized modules cannot be exported reaches ONNX: the
float model before the quantize stage is exported and quantized here with the settings that stage recorded.
Verified by top-1 agreement (verify.min_agreement), since int8 logits differ from float ones by design.

The hand-off a quantize stage records in its StageResult.details (every key optional):
    details["export"]["onnx_int8"] = {
        "float_stage": "train",          # stage whose float model to export; default: the stage before
        "method": "static" | "dynamic",  # default: the export stage's int8.onnx_method
        "per_channel": bool, "observer" | "calibrate_method": "minmax" | "histogram" | "entropy" | "percentile",
        "calibration_batches": int, "batch_size": int, "nodes_to_exclude": [onnx node names],
    }
Its values override the export stage's `int8` settings for onnx_int8.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compresspipe.stages.export.job import Exporter, ExportJob
from compresspipe.stages.export.onnx_float import available, strip_debug_info, verify_onnx, write_onnx

CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# a quantize stage's observer names, as ONNX Runtime calls them
OBSERVER_TO_METHOD = {"minmax": "minmax", "histogram": "entropy", "entropy": "entropy", "percentile": "percentile"}


def settings(job: ExportJob) -> dict[str, Any]:
    """int8 settings: the recipe's `int8`, overridden by what a quantize stage recorded for this export."""
    cfg = job.config.int8
    out: dict[str, Any] = {"method": cfg.onnx_method, "per_channel": cfg.per_channel,
                           "calibrate_method": cfg.calibrate_method, "calibration_batches": cfg.calibration_batches,
                           "batch_size": cfg.batch_size, "nodes_to_exclude": []}
    hand = job.handoff or {}
    if hand.get("method") in ("static", "dynamic"):
        out["method"] = hand["method"]
    if isinstance(hand.get("per_channel"), bool):
        out["per_channel"] = hand["per_channel"]
    observer = hand.get("calibrate_method") or hand.get("observer")
    if observer in OBSERVER_TO_METHOD:
        out["calibrate_method"] = OBSERVER_TO_METHOD[observer]
    for key in ("calibration_batches", "batch_size"):
        if isinstance(hand.get(key), int) and hand[key] > 0:
            out[key] = hand[key]
    if isinstance(hand.get("nodes_to_exclude"), list):
        out["nodes_to_exclude"] = [str(n) for n in hand["nodes_to_exclude"]]
    return out


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over the calibration split (batch 1 when the graph is fixed)."""

    def __init__(self, job: ExportJob, name: str, batch_size: int, batches: int):
        self.items = self._items(job, name, batch_size, batches)

    @staticmethod
    def _items(job: ExportJob, name: str, batch_size: int, batches: int) -> Iterator[dict[str, np.ndarray]]:
        for x in job.calibration(batch_size, batches):
            arr = x.detach().cpu().numpy()
            if job.config.dynamic_batch:
                yield {name: arr}
            else:
                for i in range(arr.shape[0]):
                    yield {name: arr[i : i + 1]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def export(job: ExportJob, folder: Path) -> list[Path]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = folder / "model.int8.onnx"
    temp = [folder / ".model.float.onnx", folder / ".model.float.onnx.data", folder / ".model.pre.onnx"]
    try:
        if job.float_module is not None:
            source = write_onnx(job.float_module, job, temp[0])[0]
        elif "onnx" in job.shared:
            source = job.shared["onnx"]
        else:
            source = write_onnx(job.module, job, temp[0])[0]
        opts = settings(job)
        prepared = _preprocess(source, temp[2], job)
        ops = {node.op_type for node in onnx.load(str(prepared)).graph.node}
        method = opts["method"]
        if method == "auto":
            method = "static" if ops & CONV_OPS else "dynamic"
        if method == "dynamic" and ops & CONV_OPS:
            job.notes.append("model.int8.onnx: dynamic quantization was asked for, but ONNX Runtime cannot run "
                             "dynamically quantized Conv; used static QDQ")
            method = "static"
        if method == "static":
            reader_cls = type("CalibrationReader", (_Calibration, CalibrationDataReader), {})
            name = onnx.load(str(prepared)).graph.input[0].name
            quantize_static(
                str(prepared), str(out), reader_cls(job, name, opts["batch_size"], opts["calibration_batches"]),
                quant_format=QuantFormat.QDQ, per_channel=opts["per_channel"],
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[opts["calibrate_method"]],
                nodes_to_exclude=opts["nodes_to_exclude"] or None,
            )
        else:
            quantize_dynamic(str(prepared), str(out), per_channel=opts["per_channel"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=opts["nodes_to_exclude"] or None)
        strip_debug_info(out)
        job.notes.append(f"model.int8.onnx: ONNX Runtime {method} int8"
                         + (f" ({opts['calibrate_method']} calibration, "
                            f"{'per-channel' if opts['per_channel'] else 'per-tensor'} weights)"
                            if method == "static" else ""))
    finally:
        for path in temp:
            path.unlink(missing_ok=True)
        for leftover in folder.glob("*-inferred.onnx"):  # quantize_static's scratch files
            leftover.unlink(missing_ok=True)
    return [out]


def _preprocess(source: Path, target: Path, job: ExportJob) -> Path:
    """Shape inference and graph cleanup ONNX Runtime recommends before quantizing; the source if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
        return target
    except Exception as exc:  # optional step: quantization still works without it
        job.notes.append(f"model.int8.onnx: ONNX Runtime pre-processing skipped ({type(exc).__name__})")
        return source


EXPORTERS = {
    "onnx_int8": Exporter(
        "onnx_int8", "model.int8.onnx", available, export, verify_onnx, int8=True,
        load_snippet=("import onnxruntime as ort; sess = ort.InferenceSession('model.int8.onnx')",
                      "logits = sess.run(None, {'input': x.astype('float32')})[0]"),
    ),
}
