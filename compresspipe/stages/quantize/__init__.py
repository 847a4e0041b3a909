"""`quantize`: int8 (dynamic, static, QAT, weight-only), int4 weight-only, fp16 and bf16.

This module is the config only and imports no torch. The implementation lives in `.stage`, the layers
that hold quantized weights as plain tensors (so artifacts are safetensors, never pickle) in `.layers`,
and the backends behind one small interface in `.backends`.

backend: auto uses torch for every method: the layers of `.layers` (int8/int4 weights) or casts (fp16/bf16).
In PyTorch those int8 layers are a float emulation: they compute exactly the int8 file's rounding in float32
ops, so the accuracy is the deployed model's, but they are not faster than float32 (torch's own int8 kernels,
torch.ao, are deprecated and not used). The int8 speed comes from the deploy runtime: the export stage's
onnx_int8 (ONNX Runtime) and executorch_int8 (XNNPACK) files, measured by `python -m benchmarks export`.
Measured by `python -m benchmarks quantize` (digits-cnn, float32 = 1x, PyTorch at batch 64, 1 thread, AMD
EPYC); an emulated model's latency is the cost of its rounding ops, not an int8 figure:

  method       backend        size    latency  accuracy
  static       torch          3.87x   0.76x    +0.0 pts   <- auto (emulated int8)
  qat          torch          3.87x   0.68x    -0.6 pts   <- auto (emulated int8)
  dynamic      torch          2.86x   0.84x    +0.0 pts   <- auto (emulated int8; only Linear, convs stay float)
  weight_only  torch/torchao  3.9x    1.0x     +0.0 pts   <- auto: torch (same layers, no torchao import)
  weight_only  int4 torch     7.56x   1.05x    -0.3 pts
  fp16         torch          1.99x   0.06x    +0.0 pts   (CPU fp16 matmuls are emulated: much slower)
  bf16         torch          1.99x   1.2x     +0.0 pts   (fast only on CPUs with AVX512-BF16/AMX)
  static       onnxruntime    1.0x    1.0x     at export  (the export stage quantizes the ONNX graph)

torchao's int8 activation kernels are fast on CPU only under torch.compile, which a saved artifact does
not run, so torchao is offered for weight_only (its affine quantization primitives compute the weights);
onnxruntime cannot produce a torch module and records what the export stage (onnx_int8) must do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from compresspipe.recipe.spec import StrictModel
from compresspipe.recipe.training import FinetuneSettings
from compresspipe.runtimes.handoff import Method, OnnxInt4Handoff, OnnxInt8Handoff, QuantizeRecord
from compresspipe.stages.base import StageConfig
from compresspipe.stages.common import SELECTOR_HELP, Selector

if TYPE_CHECKING:
    from compresspipe.recipe.spec import Recipe

Backend = Literal["auto", "torch", "torchao", "onnxruntime"]

# backend -> methods it can run at all (whether it can run *here* is checked at run time by the backend)
BACKEND_METHODS: dict[str, frozenset[str]] = {
    "torch": frozenset({"dynamic", "static", "qat", "weight_only", "fp16", "bf16"}),
    "torchao": frozenset({"weight_only"}),
    "onnxruntime": frozenset({"dynamic", "static"}),
}
WHY_NOT: dict[str, str] = {
    "torchao": "torchao's int8 activation kernels are fast on CPU only under torch.compile, which a saved "
               "artifact does not run; use backend: torch (or auto)",
    "onnxruntime": "ONNX Runtime quantizes the exported ONNX graph (export stage, format onnx_int8), not a torch "
                   "model; it offers static and dynamic int8 only",
}


class Calibration(StrictModel):
    """Batches of the calibration split that set activation ranges (the quantize stage's static and qat, and the
    export stage's int8 block: one name and one default for both). By default the whole split
    (data.calibration_samples, 256) in batches of data.eval_batch_size."""

    batches: int = Field(16, ge=0, description="calibration batches (of batch_size samples)")
    batch_size: PositiveInt | None = Field(None, description="calibration batch size (default data.eval_batch_size)")


class QatSettings(FinetuneSettings):
    """Training with fake quantization before converting to int8."""

    epochs: int = Field(3, ge=0)
    lr: float = Field(1e-4, gt=0)


class KeepFloat(StrictModel):
    """Mixed precision: the most sensitive layers stay float, one more at a time, until the drop fits."""

    max_accuracy_drop: float = Field(
        ge=0, le=1, description="largest accuracy drop against the float model (0.003 = 0.3 points), judged on the "
                                "deploy runtime's int8 file (onnxruntime), else on PyTorch's int8 emulation")


HEAD_FLOAT_SHARE = 0.10  # head: auto keeps a language model head float up to this share of the 4-bit weights


class QuantizeConfig(StageConfig):
    """Quantization: int8 weights (and activations), int4 weight-only, or fp16/bf16; smaller files.

    int8 in PyTorch is a float emulation of the int8 file; its speed comes at export (onnx_int8, executorch_int8).
    """

    type: Literal["quantize"]
    method: Method = Field(
        "static",
        description="dynamic: int8 weights, activations quantized at run time (Linear); static: int8 weights and "
                    "calibrated activations (Conv2d, Linear); qat: fake-quant training then static; weight_only: "
                    "int8/int4 weights, float compute; fp16/bf16: cast Conv/Linear, norms stay float32",
    )
    dtype: Literal["int8", "int4"] = Field("int8", description="weight dtype; int4 only with method weight_only")
    backend: Backend = Field("auto", description="auto: torch for every method (int8/int4: float emulation "
                                                 "layers, fp16/bf16: casts); see the module docstring")
    calibration: Calibration = Field(default_factory=Calibration)
    observer: Literal["minmax", "histogram", "percentile"] = Field(
        "minmax", description="how activation ranges are set from calibration: min/max, histogram "
                              "(L2-optimal range) or percentile (clips the 0.01% tails); the int8 ONNX file "
                              "sets its ranges the same way",
    )
    percentile: float = Field(99.99, gt=50, le=100, description="observer percentile: the kept upper percentile")
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per layer)")
    group_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="weight_only int4: Linear and transformers' Conv1D weights get one scale and zero point per "
                        "this many input values (ONNX Runtime's MatMulNBits block size; the onnx_int4 file holds the "
                        "same 4-bit weights); convolutions stay per-channel")
    algorithm: Literal["rtn", "hqq"] = Field(
        "rtn", description="weight_only int4: how the 4-bit groups are fitted, both by ONNX Runtime's quantizers: rtn "
                           "(round-to-nearest min/max) or hqq (Half-Quadratic Quantization: scale and float zero point "
                           "per group fitted to the weights, robust to outliers, no calibration data)")
    int4_compute: Literal["int8", "float"] = Field(
        "int8", description="weight_only int4: how the onnx_int4 file's MatMulNBits computes: int8 (activations "
                            "rounded to int8 per block, ONNX Runtime's accuracy_level 4, as its generation models run "
                            "on CPU: faster decoding) or float (weights dequantized, float activations); the file is "
                            "judged against its float model either way (deploy.fidelity)")
    head: Literal["auto", "int4", "float"] = Field(
        "auto", description="weight_only int4: a language model's output layer (lm_head, tied or not), which picks "
                            "every next token: float keeps it float (as llm-compressor's and AutoGPTQ's recipes do), "
                            "int4 holds it in 4 bits like the rest; auto keeps it float where that is cheap, when its "
                            f"weights are at most {int(HEAD_FLOAT_SHARE * 100)}% of the layers this stage would hold "
                            "in 4 bits (small models, large hidden sizes), and 4-bit where a large vocabulary makes it "
                            "a large share of every decode step")
    fold_bn: bool = Field(True, description="fold BatchNorm into the preceding quantized convolution (all but dynamic)")
    include: Selector = Field(default_factory=lambda: ["*"], description=SELECTOR_HELP)
    exclude: Selector = Field(default_factory=list, description=SELECTOR_HELP)
    qat: QatSettings = Field(default_factory=QatSettings, description="method qat: the fake-quant training")
    keep_float: KeepFloat | None = Field(
        None, description="mixed precision: {max_accuracy_drop: 0.003} keeps the most sensitive layers float until "
                          "the accuracy drop fits")

    implementation: ClassVar[str] = "compresspipe.stages.quantize.stage:QuantizeStage"
    example: ClassVar[dict[str, Any]] = {"type": "quantize", "method": "static", "calibration": {"batches": 2}}

    def makes_low_precision(self) -> bool:
        return self.backend != "onnxruntime"  # that backend leaves the PyTorch model float (export quantizes)

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.dtype == "int4" and self.method != "weight_only":
            raise ValueError(f"dtype int4 needs method weight_only (got method {self.method}); use dtype: int8")
        if self.algorithm != "rtn" and (self.method, self.dtype) != ("weight_only", "int4"):
            raise ValueError(f"algorithm {self.algorithm} fits 4-bit weight groups: it needs method weight_only with "
                             f"dtype int4 (got method {self.method}, dtype {self.dtype})")
        if self.head != "auto" and (self.method, self.dtype) != ("weight_only", "int4"):  # not the default
            raise ValueError(f"head sets whether a language model head is 4-bit: it needs method weight_only with "
                             f"dtype int4 (got method {self.method}, dtype {self.dtype})")
        if self.int4_compute != "int8" and (self.method, self.dtype) != ("weight_only", "int4"):  # not the default
            raise ValueError(f"int4_compute sets how the onnx_int4 file's 4-bit MatMuls compute: it needs method "
                             f"weight_only with dtype int4 (got method {self.method}, dtype {self.dtype})")
        if self.backend != "auto" and self.method not in BACKEND_METHODS[self.backend]:
            can = ", ".join(sorted(BACKEND_METHODS[self.backend]))
            raise ValueError(f"backend {self.backend} cannot run method {self.method} (it runs: {can}); "
                             f"{WHY_NOT.get(self.backend, '')}".rstrip("; "))
        if self.method in ("static", "qat") and self.calibration.batches == 0:
            raise ValueError(f"method {self.method} needs calibration data: set calibration.batches >= 1")
        if self.keep_float is not None and (self.method in ("fp16", "bf16", "qat") or self.backend == "onnxruntime"):
            raise ValueError(f"keep_float works with methods static, dynamic and weight_only in backend torch (got "
                             f"method {self.method}, backend {self.backend}): each candidate is measured without "
                             "training")
        return self

    def check(self, recipe: Recipe, index: int) -> list[tuple[tuple[str | int, ...], str]]:
        if self.keep_float is not None and recipe.deploy_runtime() == "executorch":
            return [(("keep_float",), "the executorch_int8 file quantizes every layer (XNNPACK), so keep_float "
                                      "would not reach the file that ships; use deploy.runtime: onnxruntime or torch")]
        return []


__all__ = ["BACKEND_METHODS", "Calibration", "KeepFloat", "Method", "OnnxInt4Handoff", "OnnxInt8Handoff", "QatSettings",
           "QuantizeConfig", "QuantizeRecord"]
