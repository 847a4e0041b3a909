"""Pydantic models of a recipe. Config is data: no tensors, no run state, no torch import."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    Field,
    PositiveInt,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from compresspipe.recipe.base import NAME_PATTERN, StrictModel
from compresspipe.recipe.search import SearchSpec

RECIPE_VERSION = 1


def _path_checker(kind: Literal["file", "dir", "any"]):
    def check(value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        path = Path(os.path.normpath(path.absolute()))  # one spelling: no `ci/base/../../x` in the lock file
        if (info.context or {}).get("check_paths", True):
            if not path.exists():
                raise ValueError(f"{kind if kind != 'any' else 'path'} not found: {path}")
            if kind == "file" and not path.is_file():
                raise ValueError(f"expected a file, found a folder: {path}")
            if kind == "dir" and not path.is_dir():
                raise ValueError(f"expected a folder, found a file: {path}")
        return str(path)

    return check


# Paths in a recipe are relative to the recipe file and must exist.
RecipeFile = Annotated[str, AfterValidator(_path_checker("file"))]
RecipeDir = Annotated[str, AfterValidator(_path_checker("dir"))]

Fraction01 = Annotated[float, Field(gt=0, lt=1)]
# constructor arguments through which torchvision (and others) fetch pretrained weights from the network
DOWNLOAD_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_backbone"})


class ModelSpec(StrictModel):
    """Where the model comes from: a registered model (`builtin`) or a torchvision classifier."""

    builtin: str | None = Field(None, description="name in the model registry, e.g. digits-cnn")
    torchvision: str | None = Field(None, description="torchvision classification model, e.g. resnet18")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor keyword arguments")
    weights: str | None = Field(None, description="torchvision weights; only none (offline)")
    checkpoint: RecipeFile | None = Field(
        None, description=".safetensors, or a .pt/.pth state_dict loaded with weights_only=True"
    )
    input_shape: list[PositiveInt] | None = Field(
        None, min_length=1, max_length=4, description="one sample's shape; default: the dataset's"
    )

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        from compresspipe.models import MODELS
        from compresspipe.registry import unknown_message

        if value is not None and value not in MODELS:
            raise ValueError(unknown_message("model", value, MODELS.names()))
        return value

    @field_validator("torchvision")
    @classmethod
    def _known_torchvision(cls, value: str | None) -> str | None:
        from compresspipe.models.names import TORCHVISION_CLASSIFIERS
        from compresspipe.registry import unknown_message

        if value is not None and value not in TORCHVISION_CLASSIFIERS:
            raise ValueError(unknown_message("torchvision classifier", value, TORCHVISION_CLASSIFIERS))
        return value

    @field_validator("kwargs")
    @classmethod
    def _no_downloads(cls, value: dict[str, Any]) -> dict[str, Any]:
        fetching = sorted(k for k in value if k in DOWNLOAD_KWARGS and value[k] not in (None, False, "none", "None"))
        if fetching:
            raise ValueError(
                f"kwargs {', '.join(fetching)} would download weights, and compresspipe runs offline; give local "
                "weights with checkpoint: path/to/file.safetensors"
            )
        return value

    @field_validator("weights")
    @classmethod
    def _offline(cls, value: str | None) -> str | None:
        if value is not None and str(value).lower() not in ("none", "null"):
            raise ValueError(
                f"weights {value!r} would need a download, and compresspipe runs offline; "
                "use weights: none and give local weights with checkpoint: path/to/file.safetensors"
            )
        return None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_format(cls, value: str | None) -> str | None:
        if value is not None and Path(value).suffix.lower() not in (".safetensors", ".pt", ".pth"):
            raise ValueError(f"checkpoint must be .safetensors, .pt or .pth (got {Path(value).name!r})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("builtin", "torchvision") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one model source: builtin: <name> or torchvision: <name>"
                + (f" (got both {given[0]} and {given[1]})" if len(given) == 2 else "")
            )
        return self

    @property
    def label(self) -> str:
        return f"torchvision:{self.torchvision}" if self.torchvision else str(self.builtin)


class DataConfig(StrictModel):
    """Options every dataset shares; each dataset subclasses this with its own fields."""

    dataset: str
    batch_size: PositiveInt = Field(64, description="training batch size")
    eval_batch_size: PositiveInt = Field(256, description="batch size for validation and calibration")
    val_fraction: Fraction01 = Field(0.2, description="share of samples held out for validation")
    calibration_samples: PositiveInt = Field(
        256, description="samples drawn from the training split for calibration (static quantization, taylor)"
    )
    max_samples: PositiveInt | None = Field(None, description="use at most this many samples (smoke runs)")

    loader: ClassVar[str]  # "module:function" (config, seed) -> DataSplits
    # what a deployed model's caller must do to raw inputs (export manifests quote it)
    preprocessing: ClassVar[str] = "as the dataset's loader prepares them (see its documentation)"


class LatencySpec(StrictModel):
    """CPU latency: warm-up, then the median of `iters` timed forward passes at a fixed thread count."""

    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 64], min_length=1)
    warmup: int = Field(5, ge=0)
    iters: PositiveInt = 30
    threads: PositiveInt = 1
    enabled: bool = True


class EvaluateSpec(StrictModel):
    latency: LatencySpec = Field(default_factory=lambda: LatencySpec())


Runtime = Literal["auto", "torch", "onnxruntime", "executorch"]
CpuTarget = Literal["auto", "portable", "x86-avx2", "x86-vnni", "arm64"]
# The file formats a row of the report can be measured as (`torch`: the stage's own safetensors artifact).
DeployFormat = Literal["torch", "onnx", "onnx_int8", "executorch", "executorch_int8"]
RUNTIME_FORMATS: dict[str, tuple[str, str]] = {  # runtime -> (float format, int8 format)
    "torch": ("torch", "torch"),
    "onnxruntime": ("onnx", "onnx_int8"),
    "executorch": ("executorch", "executorch_int8"),
}
FORMAT_RUNTIME = {f: rt for rt, pair in RUNTIME_FORMATS.items() for f in pair}
# runtime -> top-level packages it needs; checked with find_spec, so validation imports nothing heavy
RUNTIME_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": ((), ""),
    "onnxruntime": (("onnx", "onnxscript", "onnxruntime"), "pip install onnx onnxscript onnxruntime"),
    "executorch": (("executorch", "torchao"), "pip install 'compresspipe[mobile,torchao]'"),
}


def runtime_missing(runtime: str) -> str | None:
    """Why `runtime` cannot run here (a package is not installed), or None."""
    import importlib.util

    packages, hint = RUNTIME_PACKAGES.get(runtime, ((), ""))
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        return f"runtime {runtime} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} " \
               f"not installed ({hint})"
    return None


class DeploySpec(StrictModel):
    """What ships and where. Every row of the report is exported to this runtime's file and measured there:
    size is the file's bytes, accuracy and latency are measured in the runtime. PyTorch figures stay as
    secondary columns."""

    runtime: Runtime = Field(
        "auto", description="torch | onnxruntime | executorch; auto: the runtime of the recipe's export stage "
                            "(its first format), else torch. The precision follows from the stages: a row after a "
                            "quantize stage ships the runtime's int8 file"
    )
    cpu: CpuTarget = Field(
        "portable", description="the CPUs the int8 files must be correct on. portable (default): any x86 or ARM "
                                "CPU, int8 weights limited to 7 bits so ONNX Runtime's u8s8 kernels cannot saturate "
                                "on AVX2-only x86 CPUs; x86-avx2: the same; x86-vnni: x86 CPUs with AVX512-VNNI/"
                                "AVX-VNNI, full 8-bit weights; arm64: full 8-bit; auto: this machine's CPU"
    )
    threads: PositiveInt | None = Field(None, description="intra-op threads; default: evaluate.latency.threads")
    batch_sizes: list[PositiveInt] | None = Field(
        None, min_length=1, description="batch sizes timed in the runtime; default: evaluate.latency.batch_sizes"
    )
    rounds: int = Field(
        5, ge=3, le=50, description="interleaved timing rounds: every row is timed once per round, beside the "
                                    "reference, and the spread of the per-round ratios bounds the noise"
    )

    @field_validator("runtime")
    @classmethod
    def _installed(cls, value: str) -> str:
        if value != "auto":
            missing = runtime_missing(value)
            if missing:
                raise ValueError(missing)
        return value


class Limits(StrictModel):
    """Quality limits, judged against the reference (the uncompressed model). Unset limits are not checked."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="e.g. 0.01 = one point of accuracy")
    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_size_reduction: float | None = Field(None, gt=0, description="reference bytes / stage bytes")
    min_param_reduction: float | None = Field(None, gt=0)
    min_mac_reduction: float | None = Field(None, gt=0)
    min_speedup: float | None = Field(None, gt=0, description="reference latency / stage latency")
    min_sparsity: float | None = Field(None, ge=0, le=1)
    latency_batch_size: PositiveInt | None = Field(
        None, description="batch size min_speedup is judged at; default: the first of the deploy batch sizes"
    )
    format: DeployFormat | None = Field(
        None, description="judge this file format (torch | onnx | onnx_int8 | executorch | executorch_int8) "
                          "instead of the deploy runtime's file; it is built and measured for the judged stage"
    )

    def checks(self) -> list[str]:
        return [k for k, v in self if v is not None and k not in ("latency_batch_size", "format")]


class Gates(Limits):
    """Run-level gates: the final stage (or `stage`) against the reference. A miss exits 1 after all is written."""

    stage: str | None = Field(None, description="stage the gates judge; default: the last stage")
    min_reference_accuracy: float | None = Field(
        None, ge=0, le=1, description="the reference itself must reach this accuracy: ratios against a model at "
                                      "chance say nothing (the report warns below 1.5x chance either way)"
    )

    def checks(self) -> list[str]:
        return [c for c in super().checks() if c != "min_reference_accuracy"]


class StageConfig(StrictModel):
    """Base of every stage's config. Subclasses set `type: Literal[...]` and `implementation`."""

    type: str
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: the type, made unique")
    expect: Limits | None = Field(None, description="quality limits for this stage's result (exit 1 if missed)")

    # "package.module:StageClass", imported only when the stage runs.
    implementation: ClassVar[str]
    # A small, fast configuration of this stage: shown by `compresspipe stages` and run by the contract
    # tests that every registered stage must pass (save/load round trip, determinism).
    example: ClassVar[dict[str, Any]] = {}
    # Whether the stage changes float weights or layers (so it cannot follow a stage that made them low precision)
    needs_float_model: ClassVar[bool] = True

    def makes_low_precision(self) -> bool:
        """Whether this configured stage leaves int8/fp16 layers that later weight-changing stages cannot edit."""
        return False

    def check(self, recipe: Recipe, index: int) -> list[tuple[tuple[str | int, ...], str]]:
        """Rules that need the whole recipe (e.g. a teacher naming an earlier stage).

        Returns (path within this stage, message) pairs; empty when all is well.
        """
        return []


def _name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError("use at most 100 letters, digits, '.', '_' and '-', starting with a letter or digit "
                         "(it names the run folder)")
    return value


class Recipe(StrictModel):
    """A whole compression pipeline: model, data, evaluation and ordered stages."""

    compresspipe: Literal[1] = Field(description="recipe format version")
    name: Annotated[str, AfterValidator(_name)]
    seed: int = Field(0, ge=0, lt=2**62, description="one seed for data splits, initialisation and training")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec
    data: SerializeAsAny[DataConfig]
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    deploy: DeploySpec = Field(default_factory=lambda: DeploySpec(), description="what ships, and where it runs")
    stages: list[SerializeAsAny[StageConfig]] = Field(default_factory=list)
    gates: Gates | None = None
    search: SearchSpec | None = Field(
        None, description="`compresspipe search`: the values to search, the objectives and the study; `run` ignores "
                          "it and runs the recipe as written"
    )

    def stage_names(self) -> list[str]:
        return [str(s.name) for s in self.stages]

    def deploy_runtime(self) -> str:
        """The runtime every figure is measured in: deploy.runtime, or for auto the export stage's first format's."""
        if self.deploy.runtime != "auto":
            return self.deploy.runtime
        for stage in self.stages:
            for fmt in getattr(stage, "formats", None) or [] if stage.type == "export" else []:
                runtime = FORMAT_RUNTIME.get(str(fmt))
                if runtime is not None and runtime_missing(runtime) is None:
                    return runtime
        return "torch"

    def deploy_batch_sizes(self) -> list[int]:
        return list(self.deploy.batch_sizes or self.evaluate.latency.batch_sizes)

    def deploy_threads(self) -> int:
        return int(self.deploy.threads or self.evaluate.latency.threads)

    def to_data(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what the lock file stores)."""
        return self.model_dump(mode="json", exclude_none=False)
