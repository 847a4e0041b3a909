"""Model artifacts without pickle: `model.safetensors` (weights) + `model.json` (how to rebuild).

`model.json` holds the model source (a builtin or torchvision name with kwargs) and an ordered log of
structural edits. Loading builds the source model, replays the edits, then loads the weights strictly.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compresspipe.engine.edits import apply_edit
from compresspipe.engine.fsutil import atomic_write_json, read_json
from compresspipe.errors import ArtifactError

MODEL_FORMAT = "compresspipe.model"
MODEL_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_FILE = "model.json"


@dataclass
class ModelState:
    """A model plus what is needed to rebuild it from files: its source and its edit log."""

    module: nn.Module
    source: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)
    # what one stage hands a later one, by kind, each a versioned JSON object (e.g. "quantize": the float
    # stage and the int8 settings the export replays); saved in model.json with the model
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def apply(self, edit: dict[str, Any]) -> None:
        """Apply an edit to the module and append it to the log."""
        self.module = apply_edit(self.module, edit)
        self.edits.append(edit)

    def record(self, edit: dict[str, Any]) -> None:
        """Append an edit that was already applied by other code (its replay must give the same structure)."""
        self.edits.append(edit)

    def clone(self) -> ModelState:
        return ModelState(copy.deepcopy(self.module), copy.deepcopy(self.source), tuple(self.input_shape),
                          self.num_classes, copy.deepcopy(self.edits), copy.deepcopy(self.records))

    def describe(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "source": self.source,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "edits": self.edits,
            "records": self.records,
            "weights": WEIGHTS_FILE,
        }


def _tensors_for_saving(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict as contiguous CPU tensors, tied tensors stored once (aliases listed separately)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, value in module.state_dict(keep_vars=False).items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"state entry {name!r} is a {type(value).__name__}, not a tensor; cannot save without pickle")
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype) if value.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def save_model(state: ModelState, folder: Path) -> list[Path]:
    """Write model.safetensors and model.json into folder (atomically); return the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _tensors_for_saving(state.module)
    weights = folder / WEIGHTS_FILE
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": f"{MODEL_FORMAT}/{MODEL_FORMAT_VERSION}"})
    # one metadata key only: safetensors writes a multi-key header in hash order, which breaks byte-identical files
    os.replace(tmp, weights)
    desc = state.describe()
    desc["aliases"] = aliases
    atomic_write_json(folder / MODEL_FILE, desc)
    return [weights, folder / MODEL_FILE]


def load_model(folder: Path, map_location: str | torch.device = "cpu") -> ModelState:
    """Rebuild a model from its folder: source, edit replay, weights. Never unpickles."""
    from compresspipe.models.factory import build_model

    desc_path, weights = folder / MODEL_FILE, folder / WEIGHTS_FILE
    for p in (desc_path, weights):
        if not p.is_file():
            raise ArtifactError(f"{p}: missing; a model folder needs {MODEL_FILE} and {WEIGHTS_FILE}")
    try:
        desc = read_json(desc_path)
    except ValueError as exc:
        raise ArtifactError(f"{desc_path}: not valid JSON ({exc})") from None
    if desc.get("format") != MODEL_FORMAT:
        raise ArtifactError(f"{desc_path}: not a compresspipe model description")
    if desc.get("version") != MODEL_FORMAT_VERSION:
        raise ArtifactError(
            f"{desc_path}: model format version {desc.get('version')!r}; this compresspipe reads {MODEL_FORMAT_VERSION}"
        )
    module = build_model(desc["source"])
    state = ModelState(module, desc["source"], tuple(desc["input_shape"]), desc.get("num_classes"))
    for edit in desc.get("edits", []):
        state.apply(edit)
    records = desc.get("records", {})
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        raise ArtifactError(f"{desc_path}: 'records' must map a kind to an object")
    state.records = records
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights}: cannot read weights ({exc})") from None
    for alias, canonical in desc.get("aliases", {}).items():
        if canonical in tensors:
            tensors[alias] = tensors[canonical]
    try:
        result = state.module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights}: weights do not fit the rebuilt model: {str(exc).splitlines()[-1].strip()}") from None
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise ArtifactError(f"{weights}: weights do not match the rebuilt model ({', '.join(problems[:5])}"
                            f"{' ...' if len(problems) > 5 else ''})")
    state.module.eval()
    return state
