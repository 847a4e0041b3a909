"""ONNX files this process has written, found again by content.

A run exports the same float model several times: for the previous stage's row, as the quantize stage's int8 or
int4 source, and in the export stage. torch.onnx's dynamo exporter takes seconds for a small CNN and tens of
seconds for a decoder with a key/value cache, so a model whose classes, attributes, weights, buffers and export
settings all match one exported before is copied from that file instead of exported again. Anything the content
cannot vouch for (a forward replaced on an instance, a forward hook) is exported afresh. The copies live in a
private temporary folder, removed when the process ends (and by the next process, when this one was killed);
only the last few files are kept.

The int8 file is kept the same way (onnx_int8): the quantize row's deploy file and the export stage's onnx_int8
quantize the same float file with the same settings and calibration batches, so the second is the first's copy,
not a second calibration and mixed-precision search.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresspipe.cache import scratch_dir

MAX_ENTRIES = 4
_PLAIN = (bool, int, float, str, type(None))


@dataclass
class Entry:
    files: list[Path]  # the cached copy (a self-contained .onnx file)
    notes: list[str] = field(default_factory=list)  # what the export said (notes), said again on a hit
    meta: dict[str, str] = field(default_factory=dict)  # what the exporter returned (key/value cache names)
    extra: dict[str, Any] = field(default_factory=dict)  # what else the writer decided (int8: float layers)


_entries: OrderedDict[str, Entry] = OrderedDict()
_folder: Path | None = None


def _plain(value: Any) -> Any:
    """A module attribute as text when it is plain data (numbers, strings, tuples of them), else None."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, tuple | list) and all(isinstance(v, _PLAIN) for v in value):
        return repr(value)
    return None


def fingerprint(module: nn.Module, settings: dict[str, Any]) -> str | None:
    """sha256 over what decides the exported graph: every submodule's class (by identity: the same code) and plain
    attributes, a Hugging Face config, every parameter and buffer (name, dtype, shape, bytes, which are tied),
    and the export `settings`. None when the module cannot be vouched for by its content."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(torch.__version__.encode())
    for name, sub in module.named_modules(remove_duplicate=False):
        if "forward" in sub.__dict__ or sub._forward_hooks or sub._forward_pre_hooks:
            return None
        cls = type(sub)
        attrs = {k: _plain(v) for k, v in sorted(sub.__dict__.items()) if not k.startswith("_") and _plain(v)}
        digest.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{id(cls)}|{sub.training}|{attrs}".encode())
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            digest.update(config.to_json_string().encode())
    first: dict[int, str] = {}
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    try:
        for name, tensor in tensors:
            t = tensor.detach()
            ptr = t.data_ptr()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{first.setdefault(ptr, name)}".encode())
            if first[ptr] == name and t.numel():
                digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError, ValueError):  # sparse, meta or exotic tensors: exported afresh, never guessed
        return None
    return digest.hexdigest()


def lookup(key: str | None, path: Path) -> Entry | None:
    """Copy a cached export to `path`; the entry, or None when there is none."""
    if key is None or key not in _entries:
        return None
    entry = _entries[key]
    if not all(f.exists() for f in entry.files):
        del _entries[key]
        return None
    _entries.move_to_end(key)
    shutil.copyfile(entry.files[0], path)
    return entry


def store(key: str | None, files: list[Path], notes: list[str], meta: dict[str, str],
          extra: dict[str, Any] | None = None) -> None:
    """Keep a copy of the files just exported under `key`; the oldest entries go beyond MAX_ENTRIES."""
    global _folder
    if key is None:
        return
    if _folder is None:
        _folder = scratch_dir("onnx")
        atexit.register(shutil.rmtree, _folder, True)
    if len(files) != 1:  # weights in a .data file name it from the .onnx: such (huge) files are not kept
        return
    target = _folder / f"{key}.onnx"
    shutil.copyfile(files[0], target)
    _entries[key] = Entry([target], list(notes), dict(meta), copy.deepcopy(extra or {}))
    while len(_entries) > MAX_ENTRIES:
        _, old = _entries.popitem(last=False)
        for f in old.files:
            f.unlink(missing_ok=True)


def clear() -> None:
    """Forget every cached file (tests)."""
    for entry in _entries.values():
        for f in entry.files:
            f.unlink(missing_ok=True)
    _entries.clear()
