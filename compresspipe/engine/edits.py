"""Structural edits: replayable changes to a model's architecture, recorded in `model.json`.

Loading an artifact builds the model from its source, replays the edit log in order, then loads the
weights. Stages apply edits through the same functions, so a replay always matches the original.
New stages add edit kinds with `@register_edit("kind")`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compresspipe.errors import ArtifactError

EditFn = Callable[[nn.Module, dict[str, Any]], nn.Module]
EDITS: dict[str, EditFn] = {}


def register_edit(kind: str) -> Callable[[EditFn], EditFn]:
    def deco(fn: EditFn) -> EditFn:
        if kind in EDITS:
            raise ValueError(f"edit kind {kind!r} registered twice")
        EDITS[kind] = fn
        return fn

    return deco


def apply_edit(module: nn.Module, edit: dict[str, Any]) -> nn.Module:
    kind = edit.get("kind")
    fn = EDITS.get(str(kind))
    if fn is None:
        _load_edit_providers()
        fn = EDITS.get(str(kind))
    if fn is None:
        raise ArtifactError(f"unknown edit kind {kind!r} in model.json; known: {', '.join(sorted(EDITS))}")
    return fn(module, edit)


# Builtin modules that register more edit kinds; imported on demand when a log names an unknown kind.
# (Only these fixed names: a model.json file can never make us import a module it names.)
EDIT_PROVIDERS: list[str] = [
    "compresspipe.stages.prune",
    "compresspipe.stages.factorize",
    "compresspipe.stages.quantize",
    "compresspipe.stages.distill",
]


def _load_edit_providers() -> None:
    import importlib

    for name in EDIT_PROVIDERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


# -- helpers shared by edit kinds ------------------------------------------------------------------


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"edit names module {name!r}, which the model does not have") from None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(root, parent_name)
    setattr(parent, child, new)
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
    return {"kind": "resize", "version": 1, "modules": modules}


@register_edit("resize")
def _apply_resize(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    for name, change in edit["modules"].items():
        mod = get_submodule(model, name)
        for attr, value in change.get("attrs", {}).items():
            old = getattr(mod, attr, None)
            setattr(mod, attr, tuple(value) if isinstance(old, tuple) or isinstance(value, list) else value)
        for tname, shape in change.get("tensors", {}).items():
            old_p = mod._parameters.get(tname)
            old_b = mod._buffers.get(tname)
            if old_p is not None:
                mod._parameters[tname] = nn.Parameter(
                    torch.zeros(shape, dtype=old_p.dtype), requires_grad=old_p.requires_grad
                )
            elif old_b is not None:
                mod._buffers[tname] = torch.zeros(shape, dtype=old_b.dtype)
            else:
                raise ArtifactError(f"resize edit names tensor {name}.{tname}, which the model does not have")
    return model


# -- replace: swap a submodule for a tree of torch.nn layers (factorization) -----------------------

# Only these classes can be built from model.json: a file can never make us import code.
SAFE_LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Sequential, nn.Identity, nn.ReLU, nn.BatchNorm1d,
        nn.BatchNorm2d, nn.Flatten, nn.Dropout, nn.LayerNorm, nn.GELU, nn.ReLU6, nn.SiLU,
    )
}


def layer_spec(module: nn.Module) -> dict[str, Any]:
    """JSON description of a module built only from SAFE_LAYERS, enough to rebuild it (weights aside)."""
    cls = type(module)
    if cls.__name__ not in SAFE_LAYERS or SAFE_LAYERS[cls.__name__] is not cls:
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


def build_layer(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("type")
    cls = SAFE_LAYERS.get(str(kind))
    if cls is None:
        raise ArtifactError(f"layer type {kind!r} in model.json is not allowed; allowed: {', '.join(SAFE_LAYERS)}")
    if cls is nn.Sequential:
        seq = nn.Sequential()
        for name, child in spec.get("children", []):
            seq.add_module(str(name), build_layer(child))
        return seq
    kwargs = dict(spec.get("kwargs", {}))
    for key in ("kernel_size", "stride", "dilation", "normalized_shape"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if isinstance(kwargs.get("padding"), list):
        kwargs["padding"] = tuple(kwargs["padding"])
    layer = cls(**kwargs)
    if "dtype" in spec:
        layer = layer.to(dtype_from_name(spec["dtype"]))
    return layer


def replace_edit(name: str, new: nn.Module, **info: Any) -> dict[str, Any]:
    return {"kind": "replace", "version": 1, "module": name, "layer": layer_spec(new), **info}


@register_edit("replace")
def _apply_replace(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    get_submodule(model, edit["module"])  # must exist
    return set_submodule(model, edit["module"], build_layer(edit["layer"]))


# -- cast: change floating dtype of the whole model or some modules (fp16 / bf16) ------------------


@register_edit("cast")
def _apply_cast(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    dtype = dtype_from_name(edit["dtype"])
    names = edit.get("modules")
    targets = [get_submodule(model, n) for n in names] if names is not None else [model]
    for mod in targets:
        mod.to(dtype)
    return model
