"""What `run` and `plan` share before any stage: the device, the stage implementations, the data, the checks
that can fail on bad input, and the baseline model (built here and nowhere else)."""

from __future__ import annotations

import platform
import random
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compresspipe.artifacts.files import sha256_file, sha256_json
from compresspipe.artifacts.io import ModelIO
from compresspipe.artifacts.model import ModelState
from compresspipe.data.config import text_target
from compresspipe.data.sources import DataSplits, load_data
from compresspipe.errors import CompressPipeError, InputError
from compresspipe.models.factory import build_recorded, recorded_source
from compresspipe.models.inputs import forward
from compresspipe.recipe.spec import InputTensor, Recipe, StageConfig
from compresspipe.registry import import_ref
from compresspipe.stages.base import Stage

PACKAGES = ("compresspipe", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "torchao",
            "executorch", "safetensors", "pydantic", "numpy", "scikit-learn", "timm", "transformers")
_SPLITS = {"train_data": "train", "calibration_data": "calibration"}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for, but no CUDA device is available here; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_implementation(config: StageConfig) -> type[Stage]:
    try:
        impl = import_ref(config.implementation)
    except Exception as exc:  # a plugin's import error is reported with its name
        raise InputError(f"stage {config.name!r} ({config.type}): cannot import its implementation "
                         f"{config.implementation!r}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(impl, type) and issubclass(impl, Stage)):
        raise InputError(f"stage type {config.type!r}: {config.implementation!r} is not a Stage subclass")
    return impl


def check_needs(recipe: Recipe, stages: list[Stage], data: DataSplits) -> None:
    """Every need every configured stage declares, before anything runs: data splits and teachers."""
    names = recipe.stage_names()
    for i, (cfg, stage) in enumerate(zip(recipe.stages, stages, strict=True)):
        for need in stage.needs():
            why = f" ({need.why})" if need.why else ""
            if need.what in _SPLITS:
                split = _SPLITS[need.what]
                if len(getattr(data, split)) == 0:
                    raise InputError(f"stage {cfg.name!r} ({cfg.type}) needs {split} data{why}, but the {split} "
                                     f"split of dataset {recipe.data.dataset!r} is empty; give it more samples")
            elif need.what == "teacher" and need.teacher not in (None, "baseline", *names[:i]):
                raise InputError(f"stage {cfg.name!r} ({cfg.type}) needs teacher {need.teacher!r}{why}, which "
                                     f"is neither baseline nor a stage before it ({', '.join(names[:i]) or 'none'})")


def model_io(recipe: Recipe, data: DataSplits) -> ModelIO:
    """What the baseline takes and gives: the recipe's inputs (or the data's), checked against the data's
    samples, with the task, class names and preprocessing the data brings."""
    given = recipe.model.input_spec()
    found = {i.name: i for i in data.inputs}
    if given is None:
        inputs = list(data.inputs)
    else:
        if recipe.model.input_shape is not None and [i.name for i in data.inputs] == ["input"] \
                and list(recipe.model.input_shape) != data.inputs[0].shape:
            raise InputError(f"model.input_shape is {list(recipe.model.input_shape)} but dataset "
                                 f"{recipe.data.dataset!r} gives samples of shape {data.inputs[0].shape}")
        names = [i.name for i in given]
        if sorted(names) != sorted(found):
            raise InputError(f"model.inputs names {', '.join(names)} but dataset {recipe.data.dataset!r} gives "
                             f"{', '.join(found)}" + (" (one tensor is called 'input'; name several with the "
                                                       "dataset's inputs field)" if "input" in found else ""))
        inputs = []
        for spec in given:
            have = found[spec.name]
            if spec.shape != have.shape or spec.dtype != have.dtype:
                raise InputError(f"model.inputs {spec.name}: {spec.dtype} {spec.shape} per sample, but dataset "
                                 f"{recipe.data.dataset!r} gives {have.dtype} {have.shape}")
            inputs.append(InputTensor(name=spec.name, shape=spec.shape, dtype=spec.dtype,
                                      dynamic=spec.dynamic or have.dynamic, range=spec.range or have.range))
    return ModelIO(inputs=inputs, task=recipe.task, classes=data.classes, preprocessing=data.preprocessing)


def build_baseline(recipe: Recipe, data: DataSplits) -> ModelState:
    """The recipe's model as given: built from its source with the recipe's seed, with a Hugging Face folder's
    weights and the checkpoint loaded."""
    io = model_io(recipe, data)
    source = recorded_source(recipe.model, recipe.task, data.num_classes, io.classes)
    seed_everything(recipe.seed)
    module, notes = build_recorded(recipe.model, source, recipe.task)
    data.notes.extend(notes)
    labels = ((source.get("huggingface") or {}).get("config") or {}).get("id2label")
    if io.classes is None and isinstance(labels, dict) and recipe.task != "language_modeling" \
            and sorted(labels) == sorted(str(i) for i in range(data.num_classes)):
        io = io.model_copy(update={"classes": [str(labels[str(i)]) for i in range(data.num_classes)]})
    return ModelState(module.eval(), source, tuple(io.inputs[0].shape), data.num_classes, io=io)


def check_model_on_data(recipe: Recipe, data: DataSplits, state: ModelState) -> None:
    """The model runs on a batch of the data, and its outputs cover every label (a class id beyond its outputs
    would fail mid-training): exit 2 before any stage."""
    from compresspipe.metrics.tasks import TASKS

    batch = next(iter(data.loader("val", min(2, len(data.val)))))  # type: ignore[arg-type]
    x, y = batch
    try:
        with torch.no_grad():
            out = forward(state.module.eval(), x)
    except CompressPipeError:
        raise
    except Exception as exc:  # the model cannot run on the data: say so before anything runs
        raise InputError(f"model {recipe.model.label} cannot run on a batch of dataset {recipe.data.dataset!r} "
                         f"({type(exc).__name__}: {str(exc).strip()[:300]})") from None
    if not isinstance(out, torch.Tensor):
        raise InputError(f"model {recipe.model.label} returns {type(out).__name__}, not a tensor of outputs")
    info = TASKS[recipe.task]
    if info.float_targets:
        if out[0].numel() != y[0].numel():
            raise InputError(f"model {recipe.model.label} gives {out[0].numel()} output(s) per sample but the "
                             f"regression targets have {y[0].numel()}")
        return
    want = 3 if info.per_position else 2
    if out.dim() != want:
        raise InputError(f"task {recipe.task} needs outputs of shape {'[batch, positions, classes]' if want == 3 else '[batch, classes]'}; "
                         f"model {recipe.model.label} gives {list(out.shape)}")
    if info.per_position and tuple(out.shape[:2]) != tuple(y.shape[:2]):
        raise InputError(f"model {recipe.model.label} gives {out.shape[1]} positions per sample, the labels "
                         f"{y.shape[1]}")
    classes = int(out.shape[-1])
    if data.num_classes > classes:
        raise InputError(f"dataset {recipe.data.dataset!r} has labels up to {data.num_classes - 1} "
                         f"({data.num_classes} classes), but model {recipe.model.label} has {classes} outputs: "
                         "labels outside the model's classes would fail in training; give the model "
                         f"{data.num_classes} outputs (num_classes / num_labels) or fix the labels")


@dataclass
class RunSetup:
    """A recipe made ready to run: nothing here changed a weight or wrote a file."""

    recipe: Recipe
    device: torch.device
    stages: list[Stage]
    data: DataSplits
    inputs: dict[str, Any]  # fingerprints of what the run reads (data, checkpoint): resume refuses changes
    _baseline: ModelState | None = None

    def lock(self, recipe_path: Path | None) -> dict[str, Any]:
        """recipe.lock.yaml: the resolved recipe and everything that makes the run reproducible."""
        return {
            "format": "compresspipe.lock",
            "version": 1,
            "recipe_file": str(recipe_path.resolve()) if recipe_path else None,
            "recipe_sha256": sha256_json(self.recipe.to_data()),
            "inputs": self.inputs,
            "seed": self.recipe.seed,
            "device": str(self.device),
            # training sums in a different order with another thread count: verify re-runs with this many
            "torch_threads": torch.get_num_threads(),
            "packages": package_versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "recipe": self.recipe.to_data(),
        }

    def baseline(self) -> ModelState:
        """The recipe's model as given (its checkpoint loaded), the row every report starts with. The first call
        hands over the model `prepare` built and checked; later calls build it again."""
        state, self._baseline = self._baseline, None
        return state if state is not None else build_baseline(self.recipe, self.data)


def prepare(recipe: Recipe, fingerprint: bool = True) -> RunSetup:
    """Everything that can fail on bad input, before any weight is touched or file written: the data and its
    labels, the model and whether it runs on the data."""
    device = resolve_device(recipe.device)
    stages = [stage_implementation(cfg)(cfg) for cfg in recipe.stages]
    seed_everything(recipe.seed)
    given = recipe.model.input_spec()
    shape = tuple(given[0].shape) if given else None
    data = load_data(text_target(recipe.data, recipe.task), recipe.seed, shape, recipe.task)
    check_needs(recipe, stages, data)
    baseline = build_baseline(recipe, data)
    check_model_on_data(recipe, data, baseline)
    inputs: dict[str, Any] = {}
    if fingerprint:
        inputs["data"] = data.fingerprint()
        if data.files:
            inputs["data_files"] = data.files
        if recipe.model.checkpoint:
            inputs["checkpoint"] = sha256_file(Path(recipe.model.checkpoint))
        if baseline.source.get("sha256"):
            inputs["model_code"] = baseline.source["sha256"]
    return RunSetup(recipe, device, stages, data, inputs, baseline)


def reference_name(recipe: Recipe) -> str:
    """The uncompressed model ratios compare with: the last of the leading train stages, else the baseline."""
    ref = "baseline"
    for cfg in recipe.stages:
        if cfg.type != "train":
            break
        ref = str(cfg.name)
    return ref
