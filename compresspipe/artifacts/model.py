"""Model artifacts without pickle: `model.safetensors` (weights) + `model.json` (how to rebuild).

`model.json` holds the model source (a builtin, torchvision, timm or Hugging Face model, or a Python file with its
sha256), what the model takes and gives (`io`: inputs, task, class names, preprocessing), an ordered log of
structural edits and the records stages hand each other. Loading checks every field, replays the edits on the meta
device first and compares the shapes with the safetensors header, so a tampered file is refused before any
memory is spent on it; then it builds the model, replays the edits and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compresspipe.artifacts.edits import apply_edit, check_edit
from compresspipe.artifacts.files import atomic_write_json, make_readable
from compresspipe.artifacts.io import ModelIO
from compresspipe.artifacts.records import Record, get_record, record_from_json
from compresspipe.errors import ArtifactError, CompressPipeError

MODEL_FORMAT = "compresspipe.model"
MODEL_FORMAT_VERSION = 2  # 2: `io` (inputs, task, classes, preprocessing); version 1 files read as one float input
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
MODEL_FILE = "model.json"
MAX_DESCRIPTION_BYTES = 32 * 2**20  # model.json: the edit log of a very large model is a few MB
MAX_EDITS = 10_000
R = TypeVar("R", bound=Record)


@dataclass
class ModelState:
    """A model plus what is needed to rebuild it from files: its source, its edit log and its records."""

    module: nn.Module
    source: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)
    # what one stage hands a later one, by record kind (artifacts.records); saved in model.json with the model
    records: dict[str, Record] = field(default_factory=dict)
    # inputs, task, class names, preprocessing; default: one float tensor of input_shape, classification
    io: ModelIO | None = None

    def __post_init__(self) -> None:  # a recipe's model block may be passed: keep only what rebuilds the model
        from compresspipe.models.factory import SOURCE_KEYS

        self.source = {k: v for k, v in self.source.items() if k in SOURCE_KEYS and v is not None}
        if self.io is None:
            self.io = ModelIO.single(self.input_shape)
        self.input_shape = tuple(self.io.inputs[0].shape)

    @property
    def spec(self) -> ModelIO:
        """What the model takes and gives (never None after construction)."""
        assert self.io is not None  # noqa: S101 - set in __post_init__
        return self.io

    @property
    def task(self) -> str:
        return self.spec.task

    def apply(self, edit: dict[str, Any]) -> None:
        """Apply an edit to the module and append it to the log."""
        self.module = apply_edit(self.module, edit)
        self.edits.append(edit)

    def record(self, edit: dict[str, Any]) -> None:
        """Append an edit that was already applied by other code (its replay must give the same structure)."""
        check_edit(edit)
        self.edits.append(edit)

    def put(self, record: Record) -> None:
        """Hand a record to later stages (replaces one of the same kind)."""
        self.records[record.KIND] = record

    def get(self, cls: type[R]) -> R | None:
        return get_record(self.records, cls)

    def clone(self) -> ModelState:
        return ModelState(copy.deepcopy(self.module), copy.deepcopy(self.source), tuple(self.input_shape),
                          self.num_classes, copy.deepcopy(self.edits), dict(self.records), self.io)

    def describe(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "source": self.source,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "io": self.spec.model_dump(mode="json"),
            "edits": self.edits,
            "records": {kind: r.to_json() for kind, r in self.records.items()},
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
    make_readable(tmp)
    # one metadata key only: safetensors writes a multi-key header in hash order, which breaks byte-identical files
    os.replace(tmp, weights)
    desc = state.describe()
    desc["aliases"] = aliases
    atomic_write_json(folder / MODEL_FILE, desc)
    return [weights, folder / MODEL_FILE]


def read_description(path: Path) -> dict[str, Any]:
    """model.json, checked field by field: every problem names the file and the key."""
    try:
        size = path.stat().st_size
        if size > MAX_DESCRIPTION_BYTES:
            raise ArtifactError(f"{path}: {size} bytes, more than a model description can be "
                                f"({MAX_DESCRIPTION_BYTES} bytes)")
        desc = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc})") from None

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ArtifactError(f"{path}: {key}: {what}")

    need(isinstance(desc, dict), "(top level)", f"must be an object (got {type(desc).__name__})")
    need(desc.get("format") == MODEL_FORMAT, "format", f"not a compresspipe model description (want {MODEL_FORMAT!r})")
    need(type(desc.get("version")) is int and desc["version"] in READABLE_VERSIONS, "version",
         f"model format version {desc.get('version')!r}; this compresspipe reads "
         f"{', '.join(map(str, READABLE_VERSIONS))}")
    shape = desc.get("input_shape")
    need(isinstance(shape, list) and 1 <= len(shape) <= 8 and all(type(d) is int and 0 < d <= 2**20 for d in shape),
         "input_shape", f"must be a list of 1 to 8 positive ints (got {shape!r})")
    classes = desc.get("num_classes")
    need(classes is None or (type(classes) is int and classes > 0), "num_classes",
         f"must be a positive int or null (got {classes!r})")
    need(isinstance(desc.get("edits", []), list) and len(desc.get("edits", [])) <= MAX_EDITS, "edits",
         f"must be a list of at most {MAX_EDITS} edits")
    need(isinstance(desc.get("records", {}), dict), "records", "must map a record kind to an object")
    aliases = desc.get("aliases", {})
    need(isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()),
         "aliases", "must map tensor names to tensor names")
    from pydantic import ValidationError

    from compresspipe.models.factory import check_source

    try:
        desc["io"] = ModelIO.model_validate(desc["io"]) if "io" in desc else ModelIO.single(shape)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ArtifactError(f"{path}: io.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        desc["source"] = check_source(desc.get("source"))
    except CompressPipeError as exc:
        raise ArtifactError(f"{path}: source: {exc}") from None
    if "python" in desc["source"] and "sha256" not in desc["source"]:
        raise ArtifactError(f"{path}: source: a python model source must record its file's sha256")
    for i, edit in enumerate(desc.get("edits", [])):
        try:
            check_edit(edit)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: edits[{i}]: {exc}") from None
    return desc


def _header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header, without reading the tensors."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{weights}: cannot read the weights file ({exc})") from None


def _build(desc: dict[str, Any], path: Path, device: str) -> nn.Module:
    from compresspipe.models.factory import build_model

    with torch.device(device):
        try:
            module = build_model(desc["source"], desc["io"].task)
        except CompressPipeError as exc:
            raise ArtifactError(f"{path}: source: {exc}") from None
        for i, edit in enumerate(desc.get("edits", [])):
            try:
                module = apply_edit(module, edit)
            except ArtifactError as exc:
                raise ArtifactError(f"{path}: edits[{i}]: {exc}") from None
    return module


def load_model(folder: Path, map_location: str | torch.device = "cpu", allow_code: bool = False) -> ModelState:
    """Rebuild a model from its folder: source, edit replay, weights. Never unpickles.

    Every field of model.json is checked first; the edits are replayed on the meta device (no memory) and
    the shapes compared with the weights file's header before the model is built for real. A model built by a
    Python file (`python:` source) runs that file: only with `allow_code` (or inside `allowing_code()`), and only
    if its sha256 is the one recorded.
    """
    from compresspipe.models.code import allowing_code

    with allowing_code(allow_code):
        return _load_model(folder, map_location)


def _load_model(folder: Path, map_location: str | torch.device) -> ModelState:
    desc_path, weights = folder / MODEL_FILE, folder / WEIGHTS_FILE
    for p in (desc_path, weights):
        if not p.is_file():
            raise ArtifactError(f"{p}: missing; a model folder needs {MODEL_FILE} and {WEIGHTS_FILE}")
    desc = read_description(desc_path)
    records: dict[str, Record] = {}
    for kind, data in desc.get("records", {}).items():
        try:
            records[kind] = record_from_json(kind, data)
        except ArtifactError as exc:
            raise ArtifactError(f"{desc_path}: records.{kind}: {exc}") from None
    header = _header_shapes(weights)
    aliases = desc.get("aliases", {})
    built: nn.Module | None = None
    try:
        skeleton = _build(desc, desc_path, "meta")  # no memory: shapes only
    except ArtifactError:
        # some constructors compute on their tensors (torchvision's RegNet copies values while it builds), which the
        # meta device cannot: build it for real once and use that model below
        skeleton = built = _build(desc, desc_path, "cpu")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    problems = []
    for name, shape in expected.items():
        stored = name if name in header else aliases.get(name)
        if stored not in header:
            problems.append(f"missing {name}")
        elif header[stored] != shape:
            problems.append(f"{name}: file {list(header[stored])}, model {list(shape)}")
    problems += [f"unexpected {k}" for k in header if k not in expected]
    if problems:
        raise ArtifactError(f"{weights}: weights do not match the model {desc_path.name} describes "
                            f"({'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''})")
    module = built if built is not None else _build(desc, desc_path, "cpu")
    state = ModelState(module, desc["source"], tuple(desc["input_shape"]), desc.get("num_classes"),
                       list(desc.get("edits", [])), records, desc["io"])
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights}: cannot read weights ({exc})") from None
    for alias, canonical in aliases.items():
        if canonical in tensors:
            tensors[alias] = tensors[canonical]
    # a state_dict carries each module's version in `_metadata`, which some modules' loaders read (torchvision's
    # MNASNet refuses a state without it); safetensors keeps tensors only, so the rebuilt model's own versions
    # go with them: the weights were saved from this same model code
    tensors = OrderedDict(tensors)
    tensors._metadata = getattr(state.module.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
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
