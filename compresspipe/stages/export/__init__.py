"""`export`: deployable files (ONNX, ONNX int8, ExecuTorch, torch.export, safetensors), each verified
in the runtime that will run it. This module is the config only and imports no torch.

Files land in ``<stage folder>/export/`` with a ``manifest.json``; the model itself passes through unchanged.
Each format is one module in this package with ``available()``, ``export(job, folder)`` and
``verify(files, job)`` (see `compresspipe.runtimes.job`).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from compresspipe.recipe.spec import StrictModel
from compresspipe.runtimes import FORMAT_MODULES
from compresspipe.runtimes.handoff import OnnxInt8Handoff
from compresspipe.stages.base import StageConfig
from compresspipe.stages.quantize import Calibration

if TYPE_CHECKING:
    from compresspipe.recipe.spec import Recipe

Format = Literal["onnx", "onnx_int8", "onnx_int4", "executorch", "executorch_int8", "torch_export", "safetensors",
                 "torchscript", "huggingface"]

# Fixed export order: onnx_int8 reuses the float ONNX graph when both are asked for.
FORMAT_ORDER: tuple[str, ...] = (
    "safetensors", "torch_export", "onnx", "onnx_int8", "onnx_int4", "executorch", "executorch_int8", "torchscript",
    "huggingface",
)
# Quantized formats are judged by top-1 agreement (verify.min_agreement), not by atol.
INT8_FORMATS = frozenset({"onnx_int8", "onnx_int4", "executorch_int8"})

_ONNX_HINT = "pip install onnx onnxscript onnxruntime (core dependencies of compresspipe)"
# format -> [(top-level package, what to install)]; checked with find_spec, so validation imports nothing heavy
REQUIREMENTS: dict[str, list[tuple[str, str]]] = {
    "onnx": [("onnx", _ONNX_HINT), ("onnxscript", _ONNX_HINT), ("onnxruntime", _ONNX_HINT)],
    "onnx_int8": [("onnx", _ONNX_HINT), ("onnxscript", _ONNX_HINT), ("onnxruntime", _ONNX_HINT)],
    "onnx_int4": [("onnx", _ONNX_HINT), ("onnxscript", _ONNX_HINT), ("onnxruntime", _ONNX_HINT)],
    "executorch": [("executorch", "pip install 'compresspipe[mobile]'")],
    "executorch_int8": [("executorch", "pip install 'compresspipe[mobile]'"),
                        ("torchao", "pip install 'compresspipe[torchao]'")],
    "torch_export": [],
    "safetensors": [],
    "torchscript": [],
    "huggingface": [("transformers", "pip install 'compresspipe[huggingface]'")],
}
MIN_OPSET = 7
MIN_OPSET_INT8 = 13  # per-channel QDQ (QuantizeLinear with axis) needs opset 13
FALLBACK_MAX_OPSET = 23  # used only when onnx itself is missing (an onnx format then fails anyway)


def missing_requirements(fmt: str) -> list[str]:
    """Install hints for the packages `fmt` needs that are not importable here."""
    hints: list[str] = []
    for package, hint in REQUIREMENTS.get(fmt, []):
        if importlib.util.find_spec(package) is None and hint not in hints:
            hints.append(f"{package} is not installed ({hint})")
    return hints


def max_opset() -> int:
    """Highest opset the installed onnx knows (the exporter cannot write a newer one)."""
    if importlib.util.find_spec("onnx") is None:
        return FALLBACK_MAX_OPSET
    from onnx.defs import onnx_opset_version

    return int(onnx_opset_version())


class VerifySettings(StrictModel):
    """How each exported file is checked against the PyTorch model on real validation batches."""

    batches: PositiveInt = Field(8, description="validation batches (data.eval_batch_size samples each)")
    atol: float = Field(1e-4, gt=0, description="largest allowed |exported - pytorch| output difference (float "
                                                 "formats), plus rtol times the largest |output|")
    rtol: float = Field(
        1e-4, ge=0, description="allowed difference relative to the largest |output| of the verification batches: "
                                "float32 rounding grows with the values a network carries (logits of 90 differ by "
                                "2e-4 between two correct runtimes), so a file passes at |diff| <= atol + rtol * "
                                "max|output|; 0 judges by atol alone")
    min_agreement: float = Field(
        0.97, gt=0, le=1,
        description="smallest allowed top-1 agreement with PyTorch for float16/bfloat16 models and float files of "
                    "int8 layers, judged by agreement because atol on logits is meaningless after rounding; int8 "
                    "files are judged against their float source by deploy.fidelity",
    )
    max_accuracy_drop: float = Field(
        0.05, ge=0, le=1,
        description="a low-precision file that agrees less than min_agreement still passes when its accuracy is "
                    "at most this far below PyTorch's, give or take one sample (models with small margins flip close "
                    "calls under rounding); a file that loses more is broken. Gates judge smaller drops",
    )


class Int8Settings(StrictModel):
    """Post-training int8 for onnx_int8 (ONNX Runtime) and executorch_int8 (XNNPACK quantizer, PT2E), in the
    quantize stage's words. After a quantize stage (static, qat, dynamic) that stage sets the calibration and
    these keys are an error; float_small_convs and float_output shape the file either way."""

    method: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="auto: static QDQ when the graph has Conv, dynamic for Linear/RNN-only graphs and for "
                            "transformers (attention: MatMul weights and embeddings int8, convs stay float)"
    )
    observer: Literal["minmax", "histogram", "percentile", "entropy"] = Field(
        "minmax", description="activation ranges from calibration: min/max, histogram (the quantize stage's "
                              "L2-optimal range), percentile (clips the tails), entropy (ONNX Runtime's KL thresholds)"
    )
    percentile: float = Field(99.99, gt=50, le=100, description="observer percentile: the kept upper percentile")
    calibration: Calibration = Field(default_factory=lambda: Calibration(),
                                     description="batches of the calibration split, as the quantize stage's")
    per_channel: bool = Field(True, description="per-output-channel weight scales")
    float_small_convs: bool = Field(
        True, description="onnx_int8: keep convs that sum over fewer than 16 inputs per output (in_channels/groups "
                          "x kernel area, e.g. a 3x3 conv on a 1-channel image) in float, where ONNX Runtime's "
                          "float conv is faster than its int8 one; grouped and depthwise convs are quantized regardless"
    )
    float_output: bool = Field(
        True, description="onnx_int8 static: the last layer runs int8 but returns float logits instead of "
                          "rounding them to 8 bits (one node fewer, exact ranking of close scores)"
    )

    # keys of earlier releases -> their name now (the quantize stage's)
    RENAMED: ClassVar[dict[str, str]] = {"calibrate_method": "observer", "onnx_method": "method",
                                         "calibration_batches": "calibration.batches",
                                         "batch_size": "calibration.batch_size"}
    # keys a quantize stage sets for the file after it -> where, in that stage
    STAGE_SETS: ClassVar[dict[str, str]] = {
        "method": "method", "observer": "observer", "percentile": "percentile", "calibration": "calibration",
        "per_channel": "per_channel"}

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls.RENAMED.items():
                if old in data:
                    raise ValueError(f"{old} is now {new}, as the quantize stage calls it")
        return data

    def handoff(self, eval_batch_size: int) -> OnnxInt8Handoff:
        """These settings as the writers read them (no quantize stage before the export)."""
        return OnnxInt8Handoff(
            method=self.method, per_channel=self.per_channel, observer=self.observer,
            percentile=self.percentile if self.observer == "percentile" else None,
            calibration_batches=max(self.calibration.batches, 1),
            batch_size=self.calibration.batch_size or eval_batch_size,
            float_small_convs=self.float_small_convs, float_output=self.float_output)


DEFAULT_INT8 = Int8Settings()


class ExportConfig(StageConfig):
    """Write deployable files (ONNX, ONNX int8, ExecuTorch .pte, torch.export .pt2, safetensors) and verify each."""

    type: Literal["export"]
    formats: list[Format] = Field(
        default_factory=lambda: list[Format](["onnx", "safetensors"]), min_length=1,
        description="onnx | onnx_int8 | onnx_int4 (4-bit weight-only MatMulNBits, after a quantize stage with "
                    "method weight_only, dtype int4) | executorch | executorch_int8 | torch_export | safetensors | "
                    "torchscript (deprecated in torch 2.14; use executorch) | huggingface (a folder transformers "
                    "loads: config, safetensors weights, the run's tokenizer)",
    )
    opset: int = Field(18, ge=MIN_OPSET, description="ONNX opset; below 18 the TorchScript-based exporter is used")
    dynamic_batch: bool = Field(
        True, description="ONNX and torch.export files accept any batch size; false: fixed batch 1"
    )
    verify: VerifySettings = Field(default_factory=lambda: VerifySettings())
    int8: Int8Settings = Field(default_factory=lambda: Int8Settings())
    keep_names: bool = Field(
        False, description="ONNX files keep the exporter's node and tensor names (handy in Netron); by default "
                           "they get short ids, which makes a small model's file noticeably smaller"
    )
    sparse: bool = Field(
        False, description="also store the safetensors weights compactly (deflate zip; pays off for "
                           "unstructured sparsity); the manifest gives both sizes"
    )

    implementation: ClassVar[str] = "compresspipe.stages.export.stage:ExportStage"
    needs_float_model: ClassVar[bool] = False
    example: ClassVar[dict[str, Any]] = {"type": "export", "formats": ["onnx", "safetensors"], "verify": {"batches": 1}}

    def check(self, recipe: Recipe, index: int) -> list[tuple[tuple[str | int, ...], str]]:
        """An int8 setting the file would not use is an error, not a silent default: after a quantize stage that
        hands the int8 file its settings (static, qat, dynamic), that stage decides them. A key judged by its value,
        not by whether it was written: a lock file (recipe.lock.yaml) writes every default and must load again."""
        names = recipe.stage_names()
        before = [(names[i], s) for i, s in enumerate(recipe.stages[:index]) if s.type == "quantize"
                  and getattr(s, "method", None) in ("static", "qat", "dynamic")]
        if not before:
            return []
        name, stage = before[-1]
        return [(("int8", key), f"the quantize stage {name!r} (method {getattr(stage, 'method', '?')}) sets this for "
                                f"the int8 files after it: set {Int8Settings.STAGE_SETS[key]} there, or remove "
                                f"int8.{key} here")
                for key in sorted(Int8Settings.STAGE_SETS) if getattr(self.int8, key) != getattr(DEFAULT_INT8, key)]

    @field_validator("formats")
    @classmethod
    def _formats_usable(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for fmt in value:
            if fmt in seen:
                raise ValueError(f"format {fmt!r} is listed twice")
            seen.add(fmt)
        for fmt in value:
            missing = missing_requirements(fmt)
            if missing:
                raise ValueError(f"format {fmt!r} cannot run here: {'; '.join(missing)}")
        return value

    @field_validator("opset")
    @classmethod
    def _opset_possible(cls, opset: int, info: ValidationInfo) -> int:
        formats = info.data.get("formats") or []  # declared before opset, so already validated
        if not any(f.startswith("onnx") for f in formats):
            return opset
        top = max_opset()
        if opset > top:
            raise ValueError(f"opset {opset} is newer than the installed onnx supports (at most {top}); "
                             f"use opset <= {top} or upgrade onnx")
        if "onnx_int8" in formats and opset < MIN_OPSET_INT8:
            raise ValueError(f"onnx_int8 needs opset >= {MIN_OPSET_INT8} (per-channel QuantizeLinear); "
                             f"got opset {opset}")
        from compresspipe.runtimes.opset import runtime_problem

        problem = runtime_problem(opset, "onnx_int8" in formats)
        if problem:
            raise ValueError(problem)
        return opset


__all__ = ["FORMAT_MODULES", "FORMAT_ORDER", "ExportConfig", "Int8Settings", "VerifySettings"]
