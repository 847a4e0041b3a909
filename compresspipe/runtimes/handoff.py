"""What a quantize stage hands the files the runtimes build: typed, versioned and saved with the model.

The stage fills these; the runtimes' file writers (`onnx_int8`, `onnx_int4`, `executorch_pte`) and the deploy
measurement read them. They live here, below the stages, so that the writers never import a stage. This module
imports no torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from compresspipe.artifacts.records import Record
from compresspipe.recipe.spec import StrictModel

Method = Literal["dynamic", "static", "qat", "weight_only", "fp16", "bf16"]
# int4 weight-only algorithms: what the stage computes in PyTorch and the onnx_int4 file replays
ALGORITHM_LABELS = {"rtn": "round-to-nearest", "hqq": "HQQ (fitted float zero points)"}


class OnnxInt8Handoff(StrictModel):
    """The int8 ONNX file's settings, one typed object from the recipe to the file: a quantize stage's (so its
    PyTorch int8 layers and the file are calibrated alike) or, without such a stage, the export stage's `int8`
    block (`Int8Settings.handoff`). The writers read nothing else; executorch_int8's calibration reads it too."""

    method: Literal["auto", "static", "dynamic"] = "auto"
    per_channel: bool = True
    # entropy: ONNX Runtime's KL-divergence thresholds (export block only); histogram: the quantize stage's
    # L2-optimal range search, run on ONNX Runtime's histograms
    observer: Literal["minmax", "histogram", "percentile", "entropy"] = "minmax"
    percentile: float | None = None  # observer percentile: the file's calibration keeps the same share
    calibration_batches: PositiveInt = 8
    batch_size: PositiveInt = 32
    keep_float: list[str] = Field(default_factory=list, description="torch layers the int8 file keeps float")
    float_small_convs: bool = True  # the export block's file options, set on the job's copy
    float_output: bool = True

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """Records of earlier releases carry two lists no writer ever read (`layers`, `nodes_to_exclude`): they
        load without them (the layers a file keeps float travel in keep_float)."""
        if isinstance(data, dict) and ("layers" in data or "nodes_to_exclude" in data):
            data = {k: v for k, v in data.items() if k not in ("layers", "nodes_to_exclude")}
        return data


class OnnxInt4Handoff(StrictModel):
    """How the onnx_int4 file replays this stage's 4-bit weights with ONNX Runtime's MatMulNBits quantizer."""

    bits: Literal[4] = 4
    block_size: Literal[16, 32, 64, 128, 256]
    symmetric: bool = False
    algorithm: Literal["rtn", "hqq"] = "rtn"
    # how MatMulNBits computes: int8 (activations rounded to int8 per block: ONNX Runtime's accuracy_level 4, the
    # CPU setting of its generation models) or float (weights dequantized, float activations: accuracy_level 0);
    # records written before this field ran float
    compute: Literal["int8", "float"] = "float"
    layers: list[str] = Field(default_factory=list, description="torch layers whose MatMul holds 4-bit weights")
    # layers of the stage's selection it kept float, with the reason (the language model head): the file says why
    float_layers: dict[str, str] = Field(default_factory=dict)


class QuantizeRecord(Record):
    """What a quantize stage hands the export and the deploy measurement, saved with the model.

    int8 runtimes calibrate their own graphs: onnx_int8 and executorch_int8 quantize the float model of
    `float_stage` (the stage before the quantize stage) with these settings.
    """

    KIND: ClassVar[str] = "quantize"
    VERSION: ClassVar[int] = 3  # 2: onnx_int8.keep_float (mixed precision); 3: onnx_int4; older read with none

    method: Method
    # the stage whose float model the int8 runtimes quantize; None: the model itself (float with backend
    # onnxruntime; after qat its int8 layers dequantized, so the trained weights reach the file)
    float_stage: str | None
    onnx_int8: OnnxInt8Handoff | None = None
    onnx_int4: OnnxInt4Handoff | None = None

    @property
    def int8(self) -> bool:
        """Whether the model runs int8 arithmetic (the runtimes then ship their int8 file)."""
        return self.method in ("static", "qat", "dynamic")


__all__ = ["ALGORITHM_LABELS", "Method", "OnnxInt4Handoff", "OnnxInt8Handoff", "QuantizeRecord"]
