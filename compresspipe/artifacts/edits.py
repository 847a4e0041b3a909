"""Structural edits: replayable changes to a model's architecture, recorded in `model.json`.

Loading an artifact builds the model from its source, replays the edit log in order, then loads the
weights. Stages apply edits through the same functions, so a replay always matches the original.

Edit kinds live in one registry (`EDITS`), filled like the stage, model and dataset registries: a builtin
registers a lazy ``"module:attr"`` reference to an `EditKind`, a plugin announces one in the entry-point group
``compresspipe.edits``. Each kind declares its version and validates its own payload; `apply_edit` checks both
in one place, so a tampered `model.json` gets a message naming the edit, never a raw KeyError, and can only
rebuild what the kind allows (a fixed set of torch.nn layers, shapes and int attributes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from torch import nn

from compresspipe.errors import ArtifactError, RegistryError
from compresspipe.registry import Registry, unknown_message

MAX_DIM = 2**31 - 1  # one tensor dimension
MAX_DEPTH = 16  # nesting of a replaced layer's Sequential children


@dataclass(frozen=True)
class EditKind:
    """One kind of edit: its current version, the payload schema, and how to apply it to a module."""

    name: str
    version: int
    schema: type[BaseModel]  # validates the whole edit (kind and version included)
    apply: Callable[[nn.Module, Any], nn.Module]  # (module, validated payload) -> module


EDITS: Registry[EditKind] = Registry("edit kind", "compresspipe.edits")
EDITS.register("resize", "compresspipe.artifacts.edits:RESIZE")
EDITS.register("replace", "compresspipe.artifacts.edits:REPLACE")
EDITS.register("quantize", "compresspipe.stages.quantize.layers:QUANTIZE")
EDITS.register("decoder", "compresspipe.stages.prune.decoder:DECODER")


class EditModel(BaseModel):
    """Base of edit payload schemas: unknown keys are errors; numbers are strict (a bool is not an int)."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    version: StrictInt


def edit_kind(name: str) -> EditKind:
    """The registered kind, or ArtifactError listing the known ones (a plugin that fails to import included)."""
    if not isinstance(name, str) or name not in EDITS:
        raise ArtifactError(unknown_message("edit kind", name, EDITS.names()))
    try:
        kind = EDITS.get(name)
    except RegistryError as exc:
        raise ArtifactError(str(exc)) from None
    return kind


def check_edit(edit: Any) -> tuple[EditKind, Any]:
    """Validate one edit of a log: its kind is known, its version readable, its payload well-formed."""
    if not isinstance(edit, dict):
        raise ArtifactError(f"an edit must be an object (got {type(edit).__name__})")
    kind = edit_kind(edit.get("kind"))  # type: ignore[arg-type]
    version = edit.get("version")
    if type(version) is not int or not 1 <= version <= kind.version:
        raise ArtifactError(f"edit {kind.name!r} has version {version!r}; this compresspipe reads versions "
                            f"1 to {kind.version} of it")
    try:
        payload = kind.schema.model_validate(edit)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"edit {kind.name!r}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None
    return kind, payload


def apply_edit(module: nn.Module, edit: dict[str, Any]) -> nn.Module:
    kind, payload = check_edit(edit)
    return kind.apply(module, payload)


# -- helpers shared by edit kinds ------------------------------------------------------------------


def check_name(name: str, what: str = "module") -> str:
    """A dotted module path ('' is the model itself) whose parts are names PyTorch's `add_module` accepts.

    Any non-empty name without a dot is legal in PyTorch and common in libraries (torchvision's RegNet has
    `block1-0`); refused are empty parts, control characters and dunder names (`__class__`), which could reach
    Python attributes rather than submodules."""
    if name and not all(_module_part(p) for p in name.split(".")):
        raise ArtifactError(f"{what} name {name!r} is not a dotted path of module names (non-empty, printable, "
                            "no dunder names)")
    return name


def _module_part(part: str) -> bool:
    return (0 < len(part) <= 256 and "." not in part and part.isprintable()
            and not (part.startswith("__") and part.endswith("__")))


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    if not name:
        return root
    check_name(name)
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"edit names module {name!r}, which the model does not have") from None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(root, parent_name)
    check_name(child)
    if child in parent._modules:  # works for any legal name (`block1-0`), not only identifiers
        parent._modules[child] = new
    else:
        parent.add_module(child, new)
    return root


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64,
    torch.bool,
)}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ArtifactError(f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


Dim = Field(ge=0, le=MAX_DIM)
Shape = list[StrictInt]
IntAttr = StrictInt | list[StrictInt]


def _check_shape(shape: list[int], where: str) -> tuple[int, ...]:
    if len(shape) > 8 or any(not 0 <= d <= MAX_DIM for d in shape):
        raise ArtifactError(f"{where}: shape {shape} is not a tensor shape (at most 8 dims of 0..{MAX_DIM})")
    return tuple(shape)


# -- resize: new shapes for tensors and int attributes (structured pruning) ------------------------

_SHAPE_ATTRS = (int, tuple)


def shape_snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module: its own tensors' shapes and its int/tuple attributes (what pruning changes)."""
    snap: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        tensors = {n: list(t.shape) for n, t in list(mod._parameters.items()) + list(mod._buffers.items())
                   if t is not None}
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(mod).items()
                 if not k.startswith("_") and isinstance(v, _SHAPE_ATTRS) and not isinstance(v, bool)
                 and (not isinstance(v, tuple) or all(isinstance(x, int) for x in v))}
        snap[name] = {"tensors": tensors, "attrs": attrs}
    return snap


class _ModuleResize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensors: dict[str, Shape] = Field(default_factory=dict)
    attrs: dict[str, IntAttr] = Field(default_factory=dict)


class ResizeEdit(EditModel):
    """{"kind": "resize", "version": 1, "modules": {name: {"tensors": {t: shape}, "attrs": {a: int | [int]}}}}"""

    modules: dict[str, _ModuleResize]


def resize_edit(before: dict[str, dict[str, Any]], after: nn.Module) -> dict[str, Any]:
    """The `resize` edit that turns a model with the `before` snapshot into `after`'s shapes."""
    now = shape_snapshot(after)
    modules: dict[str, Any] = {}
    for name, info in now.items():
        old = before.get(name)
        if old is None:
            continue
        tensors = {k: v for k, v in info["tensors"].items() if old["tensors"].get(k) != v}
        attrs = {k: v for k, v in info["attrs"].items() if old["attrs"].get(k) != v}
        if tensors or attrs:
            modules[name] = {"tensors": tensors, "attrs": attrs}
    return {"kind": "resize", "version": RESIZE.version, "modules": modules}


def _apply_resize(model: nn.Module, edit: ResizeEdit) -> nn.Module:
    for name, change in edit.modules.items():
        mod = get_submodule(model, name)
        for attr, value in change.attrs.items():
            old = getattr(mod, attr, None) if not attr.startswith("_") else None
            # only what shape_snapshot records: existing int or int-tuple attributes (never methods, never bools)
            if isinstance(old, bool) or not isinstance(old, int | tuple) or (
                    isinstance(old, tuple) and not all(isinstance(x, int) for x in old)):
                raise ArtifactError(f"resize edit sets {name}.{attr}, which is not an int or int-tuple attribute "
                                    "of that module")
            if isinstance(old, tuple) != isinstance(value, list):
                raise ArtifactError(f"resize edit gives {name}.{attr} a {type(value).__name__}, but it is a "
                                    f"{type(old).__name__}")
            if any(v < 0 or v > MAX_DIM for v in (value if isinstance(value, list) else [value])):
                raise ArtifactError(f"resize edit gives {name}.{attr} the value {value!r}, out of range")
            setattr(mod, attr, tuple(value) if isinstance(value, list) else value)
        for tname, shape in change.tensors.items():
            size = _check_shape(shape, f"resize edit {name}.{tname}")
            old_p = mod._parameters.get(tname)
            old_b = mod._buffers.get(tname)
            if old_p is not None:
                mod._parameters[tname] = nn.Parameter(
                    torch.zeros(size, dtype=old_p.dtype, device=old_p.device), requires_grad=old_p.requires_grad
                )
            elif old_b is not None:
                mod._buffers[tname] = torch.zeros(size, dtype=old_b.dtype, device=old_b.device)
            else:
                raise ArtifactError(f"resize edit names tensor {name}.{tname}, which the model does not have")
    return model


RESIZE = EditKind("resize", 1, ResizeEdit, _apply_resize)


# -- replace: swap a submodule for a tree of torch.nn layers (factorization) -----------------------

# Only these classes can be built from model.json, each with only these constructor arguments: a file can
# never make us import code, pick a device, or set an attribute the layer does not take.
_CONV_KW = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
            "padding_mode"}
SAFE_LAYERS: dict[str, tuple[type[nn.Module], frozenset[str]]] = {
    cls.__name__: (cls, frozenset(kw))
    for cls, kw in (
        (nn.Linear, {"in_features", "out_features", "bias"}),
        (nn.Conv1d, _CONV_KW), (nn.Conv2d, _CONV_KW), (nn.Conv3d, _CONV_KW),
        (nn.Sequential, set()), (nn.Identity, set()), (nn.ReLU, set()), (nn.ReLU6, set()), (nn.SiLU, set()),
        (nn.GELU, set()),
        (nn.BatchNorm1d, {"num_features", "eps", "momentum", "affine", "track_running_stats"}),
        (nn.BatchNorm2d, {"num_features", "eps", "momentum", "affine", "track_running_stats"}),
        (nn.LayerNorm, {"normalized_shape", "eps", "elementwise_affine"}),
        (nn.Flatten, {"start_dim", "end_dim"}),
        (nn.Dropout, {"p"}),
    )
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
KwValue = StrictBool | StrictInt | StrictFloat | str | list[StrictInt] | None


def layer_spec(module: nn.Module) -> dict[str, Any]:
    """JSON description of a module built only from SAFE_LAYERS, enough to rebuild it (weights aside)."""
    cls = type(module)
    if cls.__name__ not in SAFE_LAYERS or SAFE_LAYERS[cls.__name__][0] is not cls:
        raise ArtifactError(f"cannot record layer of type {cls.__name__} in an edit")
    if isinstance(module, nn.Sequential):
        return {"type": "Sequential", "children": [[n, layer_spec(m)] for n, m in module.named_children()]}
    if isinstance(module, nn.Linear):
        kw: dict[str, Any] = {"in_features": module.in_features, "out_features": module.out_features,
                              "bias": module.bias is not None}
    elif isinstance(module, nn.modules.conv._ConvNd):
        kw = {"in_channels": module.in_channels, "out_channels": module.out_channels,
              "kernel_size": list(module.kernel_size), "stride": list(module.stride),
              "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
              "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
              "padding_mode": module.padding_mode}
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        kw = {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
              "affine": module.affine, "track_running_stats": module.track_running_stats}
    elif isinstance(module, nn.LayerNorm):
        kw = {"normalized_shape": list(module.normalized_shape), "eps": module.eps,
              "elementwise_affine": module.elementwise_affine}
    elif isinstance(module, nn.Flatten):
        kw = {"start_dim": module.start_dim, "end_dim": module.end_dim}
    elif isinstance(module, nn.Dropout):
        kw = {"p": module.p}
    else:
        kw = {}
    dtype = next((p.dtype for p in module.parameters(recurse=False)), None)
    spec: dict[str, Any] = {"type": cls.__name__, "kwargs": kw}
    if dtype is not None and dtype != torch.float32:
        spec["dtype"] = dtype_name(dtype)
    return spec


class LayerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    kwargs: dict[str, KwValue] = Field(default_factory=dict)
    children: list[tuple[str, LayerSpec]] = Field(default_factory=list)
    dtype: str | None = None


def build_layer(spec: LayerSpec | dict[str, Any], depth: int = 0) -> nn.Module:
    if isinstance(spec, dict):
        spec = LayerSpec.model_validate(spec)
    if depth > MAX_DEPTH:
        raise ArtifactError(f"a replaced layer nests Sequential deeper than {MAX_DEPTH} levels")
    entry = SAFE_LAYERS.get(spec.type)
    if entry is None:
        raise ArtifactError(f"layer type {spec.type!r} in model.json is not allowed; allowed: {', '.join(SAFE_LAYERS)}")
    cls, allowed = entry
    if cls is nn.Sequential:
        seq = nn.Sequential()
        for name, child in spec.children:
            if not _module_part(name):
                raise ArtifactError(f"child name {name!r} of a replaced Sequential is not a module name")
            seq.add_module(name, build_layer(child, depth + 1))
        return seq
    unknown = set(spec.kwargs) - allowed
    if unknown:
        raise ArtifactError(f"layer {spec.type} in model.json takes {', '.join(sorted(allowed)) or 'no arguments'}; "
                            f"not {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = dict(spec.kwargs)
    for key in ("kernel_size", "stride", "dilation", "normalized_shape", "padding"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    for key in ("in_features", "out_features", "in_channels", "out_channels", "num_features"):
        if key in kwargs and not (isinstance(kwargs[key], int) and 0 < kwargs[key] <= MAX_DIM):
            raise ArtifactError(f"layer {spec.type} in model.json: {key} must be a positive int (got {kwargs[key]!r})")
    try:
        layer = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"layer {spec.type} in model.json cannot be built: {exc}") from None
    if spec.dtype is not None:
        if spec.dtype not in FLOAT_DTYPES:
            raise ArtifactError(f"layer dtype {spec.dtype!r} in model.json; allowed: {', '.join(FLOAT_DTYPES)}")
        layer = layer.to(dtype_from_name(spec.dtype))
    return layer


class ReplaceEdit(EditModel):
    """{"kind": "replace", "version": 1, "module": name, "layer": layer spec}"""

    module: str
    layer: LayerSpec


def replace_edit(name: str, new: nn.Module, **info: Any) -> dict[str, Any]:
    return {"kind": "replace", "version": REPLACE.version, "module": name, "layer": layer_spec(new), **info}


def _apply_replace(model: nn.Module, edit: ReplaceEdit) -> nn.Module:
    old = get_submodule(model, edit.module)  # must exist
    device = next((t.device for t in (*old.parameters(), *old.buffers())), None)
    new = build_layer(edit.layer)
    return set_submodule(model, edit.module, new if device is None else new.to(device))


REPLACE = EditKind("replace", 1, ReplaceEdit, _apply_replace)
