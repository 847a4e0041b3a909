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
from compresspipe.artifacts.model import ModelState
from compresspipe.data.sources import DataSplits, load_data
from compresspipe.errors import InputError
from compresspipe.models.factory import build_from_spec, check_source
from compresspipe.recipe.spec import Recipe, StageConfig
from compresspipe.registry import import_ref
from compresspipe.stages.base import Stage

PACKAGES = ("compresspipe", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "torchao",
            "executorch", "safetensors", "pydantic", "numpy", "scikit-learn")
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


@dataclass
class RunSetup:
    """A recipe made ready to run: nothing here changed a weight or wrote a file."""

    recipe: Recipe
    device: torch.device
    stages: list[Stage]
    data: DataSplits
    inputs: dict[str, Any]  # fingerprints of what the run reads (data, checkpoint): resume refuses changes

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
        """The recipe's model as given (its checkpoint loaded), the row every report starts with."""
        module = build_from_spec(self.recipe.model).eval()
        source = self.recipe.model.model_dump(include={"builtin", "torchvision", "kwargs"}, exclude_none=True)
        return ModelState(module, check_source(source), tuple(self.data.input_shape),
                          self.data.num_classes)


def prepare(recipe: Recipe, fingerprint: bool = True) -> RunSetup:
    """Everything that can fail on bad input, before any weight is touched or file written."""
    device = resolve_device(recipe.device)
    stages = [stage_implementation(cfg)(cfg) for cfg in recipe.stages]
    seed_everything(recipe.seed)
    shape = tuple(recipe.model.input_shape) if recipe.model.input_shape else None
    data = load_data(recipe.data, recipe.seed, shape)
    if shape is not None and tuple(data.input_shape) != shape:
        raise InputError(f"model.input_shape is {list(shape)} but dataset {recipe.data.dataset!r} "
                         f"gives samples of shape {list(data.input_shape)}")
    check_needs(recipe, stages, data)
    inputs: dict[str, Any] = {}
    if fingerprint:
        inputs["data"] = data.fingerprint()
        if recipe.model.checkpoint:
            inputs["checkpoint"] = sha256_file(Path(recipe.model.checkpoint))
    return RunSetup(recipe, device, stages, data, inputs)


def reference_name(recipe: Recipe) -> str:
    """The uncompressed model ratios compare with: the last of the leading train stages, else the baseline."""
    ref = "baseline"
    for cfg in recipe.stages:
        if cfg.type != "train":
            break
        ref = str(cfg.name)
    return ref
