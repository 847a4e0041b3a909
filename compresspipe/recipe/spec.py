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


Task = Literal["classification", "sequence_classification", "token_classification", "regression",
               "language_modeling"]
InputDtype = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "bool"]
INTEGER_DTYPES = frozenset({"int64", "int32", "bool"})
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class InputTensor(StrictModel):
    """One input of the model: its name, one sample's shape (no batch axis), dtype, and its dynamic axes.

    The batch axis is always dynamic. `dynamic` names the sample axes whose size may change (e.g. {0: sequence}
    for token ids); inputs sharing a name share the size (ONNX symbolic dims, torch.export Dims).
    """

    name: str = Field(pattern=IDENTIFIER, description="argument name of the model's forward, e.g. input_ids")
    shape: list[PositiveInt] = Field(max_length=8, description="one sample's shape, e.g. [64] for 64 tokens")
    dtype: InputDtype = Field("float32", description="float32 | float16 | bfloat16 | float64 | int64 | int32 | bool")
    dynamic: dict[int, Annotated[str, Field(pattern=IDENTIFIER)]] = Field(
        default_factory=dict, description="sample axis -> name of a dynamic size, e.g. {0: sequence}"
    )
    range: tuple[int, int] | None = Field(
        None, description="integer inputs: values of example inputs are drawn from [low, high) (token ids: "
                          "[0, vocab size]); default [0, 2)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> InputTensor:
        for axis, name in self.dynamic.items():
            if not 0 <= axis < len(self.shape):
                raise ValueError(f"dynamic axis {axis} of input {self.name!r} is outside its shape {self.shape} "
                                 "(axes count from 0 within one sample; the batch axis is always dynamic)")
            if name == "batch":
                raise ValueError("'batch' names the batch axis, which is always dynamic; name sample axes "
                                 "otherwise (e.g. sequence)")
        if self.range is not None:
            if self.dtype not in INTEGER_DTYPES:
                raise ValueError(f"range applies to integer inputs; {self.name!r} is {self.dtype}")
            if self.range[0] >= self.range[1]:
                raise ValueError(f"range {list(self.range)} is empty: give [low, high) with low < high")
        return self

    @property
    def is_float(self) -> bool:
        return self.dtype not in INTEGER_DTYPES


def _single_input(shape: list[int]) -> list[InputTensor]:
    return [InputTensor(name="input", shape=list(shape))]


class HuggingFaceConfig(StrictModel):
    """A Hugging Face model built from a config (no weights, no download)."""

    config: dict[str, Any] = Field(description="the model's config.json as a mapping; model_type is required")


# Keys of a Hugging Face config or from_config kwargs that fetch code or weights, or pick a download-backed kernel.
HF_REFUSED_KEYS = {
    "auto_map": "names remote code (trust_remote_code), which compresspipe never runs",
    "trust_remote_code": "compresspipe never runs a model repository's own code",
    "quantization_config": "loads a quantization backend; quantize with a quantize stage instead",
    "cache_dir": "is a download setting, and compresspipe runs offline",
    "revision": "is a download setting, and compresspipe runs offline",
    "token": "is a download setting, and compresspipe runs offline",
    "use_kernels": "fetches kernels from the hub",
}
HF_ATTENTION = ("eager", "sdpa")
# timm arguments that load or fetch weights
TIMM_REFUSED_KWARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"})
SOURCES = ("builtin", "torchvision", "timm", "huggingface", "python")


def check_hf_config(config: Any, where: str = "config", overrides: bool = False) -> dict[str, Any]:
    """A Hugging Face config mapping we may build: a known model_type and nothing that runs or fetches code.
    `overrides`: config values to apply on top of one (kwargs), which need no model_type."""
    from compresspipe.models.library_names import names
    from compresspipe.registry import closest

    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a mapping (a config.json object), got {type(config).__name__}")
    model_type = config.get("model_type")
    if overrides and model_type is None:
        pass
    elif not isinstance(model_type, str):
        raise ValueError(f"{where} needs model_type (e.g. bert, vit, gpt2), which names the architecture")
    elif model_type not in (known := names("transformers")["model_types"]):
        hint = closest(model_type, sorted(known))
        raise ValueError(f"unknown Hugging Face model_type {model_type!r}" + (f"; did you mean {hint!r}?" if hint else
                         "") + " (the model types of the installed transformers)")
    for key, why in HF_REFUSED_KEYS.items():
        if config.get(key) not in (None, False, {}, ""):
            raise ValueError(f"{where}.{key} {why}")
    for key in ("attn_implementation", "_attn_implementation"):
        if config.get(key) not in (None, *HF_ATTENTION):
            raise ValueError(f"{where}.{key} {config[key]!r}: only {' or '.join(HF_ATTENTION)} (others load kernels "
                             "from the hub or need extra packages)")
    if not overrides:
        check_hf_size(config, where)
    return config


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        for sub in ("text_config", "vision_config"):  # composite configs
            inner = config.get(sub)
            if isinstance(inner, dict) and isinstance(inner.get(key), int):
                return int(inner[key])
    return None


def hf_param_estimate(config: dict[str, Any]) -> int | None:
    """About how many parameters a transformers config asks for, from the sizes every family names (embedding,
    attention and MLP per layer); None when it names none. A lower bound: norms and biases are left out."""
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers")
    if hidden is None or layers is None:
        return None
    vocab = _first_int(config, "vocab_size") or 0
    inner = _first_int(config, "intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim") or 4 * hidden
    positions = _first_int(config, "max_position_embeddings", "n_positions") or 0
    gated = 3 if config.get("hidden_act") in ("silu", "swiglu") or config.get("model_type") in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral") else 2
    experts = _first_int(config, "num_local_experts", "num_experts") or 1
    per_layer = 4 * hidden * hidden + gated * hidden * inner * max(experts, 1)
    return vocab * hidden + positions * hidden + layers * per_layer


def memory_bytes() -> int | None:
    """This machine's physical memory (Linux /proc/meminfo, else os.sysconf); None if unknown."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_hf_size(config: dict[str, Any], where: str = "config") -> None:
    """Refuse a config whose float32 weights alone cannot fit in this machine's memory, before anything is built."""
    params = hf_param_estimate(config)
    total = memory_bytes()
    if params is None or total is None:
        return
    need = 4 * params
    if need > 0.8 * total:
        raise ValueError(f"{where} asks for about {params / 1e9:.2f}G parameters: {need / 2**30:.1f} GiB of float32 "
                         f"weights alone (training needs about 4x that), and this machine has {total / 2**30:.1f} GiB "
                         "of memory; make the model smaller (hidden size, layers, vocabulary)")


HF_AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "language_modeling": "AutoModelForCausalLM",
    "image_classification": "AutoModelForImageClassification",
}


def hf_task(task: str, model_type: str) -> str:
    """The Hugging Face Auto-class task for a compresspipe task: classification and regression take the image
    class for image model types, the sequence class otherwise."""
    from compresspipe.models.library_names import names

    if task in ("classification", "regression"):
        image = model_type in names("transformers")["image_classification"]
        return "image_classification" if image else "sequence_classification"
    return task


def hf_unsupported(task: str, model_type: str) -> str | None:
    """Why a Hugging Face model type cannot run `task` (it has no such Auto class), or None."""
    from compresspipe.models.library_names import names

    which = hf_task(task, model_type)
    if model_type not in names("transformers")[which]:
        return (f"Hugging Face model_type {model_type!r} has no {HF_AUTO_CLASSES[which]}, which task {task} needs; "
                "pick another task or model")
    return None


def read_hf_folder(folder: Path) -> dict[str, Any]:
    import json

    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} has no config.json; a Hugging Face model folder holds config.json and its "
                         "weights (model.safetensors)")
    size = config.stat().st_size
    if size > 4 * 2**20:
        raise ValueError(f"{config}: {size} bytes is not a model config")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config}: not valid JSON ({exc})") from None
    return check_hf_config(data, "config.json")


class ModelSpec(StrictModel):
    """Where the model comes from: a registered model (`builtin`), torchvision, timm, Hugging Face, or your own
    Python file (`python`, needs --allow-code); and what it takes (`input_shape` or `inputs`)."""

    builtin: str | None = Field(None, description="name in the model registry, e.g. digits-cnn")
    torchvision: str | None = Field(None, description="torchvision classification model, e.g. resnet18")
    timm: str | None = Field(None, description="timm architecture, e.g. resnet18 (pretrained=False; weights via "
                                               "checkpoint:); pip install 'compresspipe[timm]'")
    huggingface: str | HuggingFaceConfig | None = Field(
        None, description="a local folder with config.json and model.safetensors, or {config: {...}} to build from "
                          "a config; the Auto class follows task:. Never downloads, never runs remote code; "
                          "pip install 'compresspipe[huggingface]'"
    )
    python: str | None = Field(
        None, description="path/to/file.py:factory, a function or class returning your nn.Module (runs your code: "
                          "needs --allow-code on the command line)"
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="python: the file's sha256; a file with other contents is refused")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor keyword arguments (huggingface: "
                                                                     "config overrides, e.g. num_labels)")
    weights: str | None = Field(None, description="torchvision weights; only none (offline)")
    checkpoint: RecipeFile | None = Field(
        None, description=".safetensors, or a .pt/.pth/.bin state_dict loaded with weights_only=True"
    )
    input_shape: list[PositiveInt] | None = Field(
        None, min_length=1, max_length=4, description="one float input's sample shape (shorthand for inputs:); "
                                                      "default: the dataset's"
    )
    inputs: list[InputTensor] | None = Field(
        None, min_length=1, max_length=16, description="the model's inputs (names, shapes, dtypes, dynamic axes); "
                                                       "default: input_shape, else the dataset's"
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

    @field_validator("timm")
    @classmethod
    def _known_timm(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import difflib
        import importlib.util

        from compresspipe.models.library_names import names

        if importlib.util.find_spec("timm") is None:
            raise ValueError("timm is not installed (pip install 'compresspipe[timm]')")
        arch = value.split(".", 1)[0]  # a pretrained tag (resnet18.a1_in1k) names weights, which are not fetched
        known = names("timm")["models"]
        if arch not in known:
            hints = difflib.get_close_matches(arch, sorted(known), n=3, cutoff=0.6)
            raise ValueError(f"unknown timm model {value!r}" + (f"; did you mean {' or '.join(map(repr, hints))}?"
                                                                if hints else "") + " (see timm.list_models())")
        return arch

    @field_validator("huggingface")
    @classmethod
    def _local_hf(cls, value: str | HuggingFaceConfig | None, info: ValidationInfo) -> str | HuggingFaceConfig | None:
        if value is None:
            return None
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ValueError("transformers is not installed (pip install 'compresspipe[huggingface]')")
        if isinstance(value, HuggingFaceConfig):
            check_hf_config(value.config)
            return value
        base = (info.context or {}).get("base_dir")
        folder = Path(value).expanduser()
        if not folder.is_absolute() and base is not None:
            folder = Path(base) / folder
        if not folder.is_dir():
            raise ValueError(f"{value!r} is not a local folder ({folder} does not exist): compresspipe never "
                             "downloads from the Hugging Face hub. Download the model yourself (huggingface-cli "
                             "download NAME --local-dir DIR) and give the folder, or give {config: {...}}")
        if (info.context or {}).get("check_paths", True) or (folder / "config.json").exists():
            read_hf_folder(folder)
        return str(folder)

    @field_validator("python")
    @classmethod
    def _python_opt_in(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        from compresspipe.models.code import code_allowed, refusal, split_ref

        path_text, factory = split_ref(value)
        base = (info.context or {}).get("base_dir")
        path = Path(path_text).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not ((info.context or {}).get("allow_code") or code_allowed()):
            raise ValueError(refusal(str(path)))
        if (info.context or {}).get("check_paths", True) and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return f"{path}:{factory}"

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"a sha256 is 64 hexadecimal characters written as a string; YAML read this one as a "
                             f"{type(value).__name__} ({str(value)[:20]}): quote it, sha256: \"...\"")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_matches(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A pin is checked where it is written: a file with other contents is a problem at this line."""
        python = info.data.get("python")
        if value is None or not python or not (info.context or {}).get("check_paths", True):
            return value
        from compresspipe.models.code import file_sha256, split_ref

        path = Path(split_ref(python)[0])
        if path.is_file() and (actual := file_sha256(path)) != value:
            raise ValueError(f"{path} does not match its pin: the file's sha256 is {actual}; restore the file, or "
                             "update the pin if you changed it on purpose")
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
        if value is not None and Path(value).suffix.lower() not in (".safetensors", ".pt", ".pth", ".bin"):
            raise ValueError(f"checkpoint must be .safetensors, .pt, .pth or .bin (got {Path(value).name!r})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one model source: builtin, torchvision, timm, huggingface or python"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        if self.timm is not None:
            refused = sorted(TIMM_REFUSED_KWARGS & set(self.kwargs))
            if refused:
                raise ValueError(f"kwargs {', '.join(refused)} would load or fetch timm weights; give local weights "
                                 "with checkpoint: path/to/file.safetensors")
        if self.huggingface is not None:
            check_hf_config(self.kwargs, "kwargs", overrides=True)
        if self.sha256 is not None and self.python is None:
            raise ValueError("sha256 pins the file of a python: model; there is none here")
        if self.input_shape is not None and self.inputs is not None:
            raise ValueError("give input_shape (one float input) or inputs (any inputs), not both")
        return self

    @property
    def source_key(self) -> str:
        return next(k for k in SOURCES if getattr(self, k) is not None)

    @property
    def label(self) -> str:
        key = self.source_key
        if key == "builtin":
            return str(self.builtin)
        if key == "huggingface" and isinstance(self.huggingface, HuggingFaceConfig):
            return f"huggingface:{self.huggingface.config.get('model_type')}"
        if key in ("huggingface", "python"):
            return f"{key}:{Path(str(getattr(self, key)).split(':')[0]).name}"
        return f"{key}:{getattr(self, key)}"

    def input_spec(self) -> list[InputTensor] | None:
        """The inputs the recipe gives (`inputs`, or `input_shape` as one float input); None: the dataset's."""
        if self.inputs is not None:
            return list(self.inputs)
        if self.input_shape is not None:
            return _single_input(list(self.input_shape))
        return None


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
DeployFormat = Literal["torch", "onnx", "onnx_int8", "onnx_int4", "executorch", "executorch_int8"]
RUNTIME_FORMATS: dict[str, tuple[str, str]] = {  # runtime -> (float format, int8 format)
    "torch": ("torch", "torch"),
    "onnxruntime": ("onnx", "onnx_int8"),
    "executorch": ("executorch", "executorch_int8"),
}
FORMAT_RUNTIME = {**{f: rt for rt, pair in RUNTIME_FORMATS.items() for f in pair}, "onnx_int4": "onnxruntime"}
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


class FidelitySpec(StrictModel):
    """How closely every shipped file must follow the model it came from: a file below these limits fails the run
    (exit 1, every artifact kept). An int8 file is compared with the float model it quantizes; any other file with
    the PyTorch model of its stage. Both on the whole validation split, in the deploy runtime."""

    min_agreement: float = Field(
        0.99, ge=0, le=1, description="smallest top-1 agreement with the source model (per token for token tasks; "
                                      "regression: outputs within 5% of the source's spread)")
    max_drop: float = Field(
        0.01, ge=0, le=1, description="largest top-1 accuracy drop against the source model (0.01 = one point, give "
                                      "or take one sample); tasks without top-1 are judged by agreement alone")
    tie_margin: float = Field(
        0.1, ge=0, description="samples whose source model scores its top two classes within this many logits of "
                               "each other (a probability ratio under 1.1 at the default) are ties, left out of the "
                               "agreement: a model with small margins flips them under any rounding")
    mixed_precision: bool = Field(
        True, description="an int8 file below the limits keeps its most diverging layers float, a few more at a "
                          "time (up to half the quantized layers), until it fits; the layers are listed in the report")


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
    fidelity: FidelitySpec = Field(default_factory=lambda: FidelitySpec(),
                                   description="how closely every shipped file must follow its source model")

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
    max_drop: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None, description="largest allowed worsening of any metric vs the reference, by name, e.g. {f1_macro: 0.01} "
                          "(a drop for higher-is-better metrics, a rise for mse, perplexity, loss)"
    )
    target: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="value each named metric must reach: at least it for higher-is-better metrics, at most it "
                          "for lower-is-better ones (mse, mae, perplexity, loss), e.g. {top5: 0.9, mse: 0.05}"
    )
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
    task: Task = Field(
        "classification", description="classification | sequence_classification | token_classification | regression "
                                      "| language_modeling: picks the loss, the default metric and the Hugging Face "
                                      "Auto class"
    )
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


def named_metrics(recipe: Recipe) -> list[str]:
    """The metrics the recipe's gates and expect: blocks name (every row measures them, beside the task's own)."""
    out: list[str] = []
    for limits in [cfg.expect for cfg in recipe.stages] + [recipe.gates]:
        if limits is not None:
            out += [m for m in [*(limits.max_drop or {}), *(limits.target or {})] if m != "loss"]
    return list(dict.fromkeys(out))
