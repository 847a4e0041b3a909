"""Build a model from its source (registry name or torchvision classifier) and load local weights.

Checkpoints are read without unpickling: safetensors, or a .pt/.pth state_dict under
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compresspipe.errors import InputError
from compresspipe.models import MODELS

if TYPE_CHECKING:
    from compresspipe.recipe.spec import ModelSpec

# Prefixes that wrappers add to every key: DistributedDataParallel/DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def check_source(source: Any) -> dict[str, Any]:
    """A model source (from a recipe or a model.json) checked by the recipe's own rules: one known name, plain
    JSON kwargs, and nothing that would download weights. Returns it as plain data."""
    from pydantic import ValidationError

    from compresspipe.recipe.spec import ModelSpec

    if not isinstance(source, Mapping):
        raise InputError(f"a model source must be an object (got {type(source).__name__})")
    extra = sorted(set(source) - {"builtin", "torchvision", "kwargs"})
    if extra:
        raise InputError(f"unknown key(s) {', '.join(map(repr, extra))} in a model source; allowed: builtin, "
                         "torchvision, kwargs")
    try:
        spec = ModelSpec.model_validate(dict(source), context={"check_paths": False})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "(source)"
        raise InputError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    return spec.model_dump(include={"builtin", "torchvision", "kwargs"}, exclude_none=True)


def build_model(source: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model from ``{"builtin" | "torchvision": name, "kwargs": {...}}`` (a recipe's model
    block works too: its other keys are not the source's)."""
    source = check_source({k: v for k, v in source.items() if k in ("builtin", "torchvision", "kwargs")})
    kwargs = dict(source.get("kwargs") or {})
    if source.get("builtin"):
        name = str(source["builtin"])
        factory = MODELS.get(name)
        label = name
    elif source.get("torchvision"):
        import torchvision

        name = str(source["torchvision"])
        label = f"torchvision:{name}"

        def factory(**kw: Any) -> nn.Module:
            return torchvision.models.get_model(name, weights=None, **kw)

    else:
        raise InputError("a model source needs builtin: <name> or torchvision: <name>")
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise InputError(f"model {label!r} does not accept kwargs {kwargs}: {exc}") from None
    except ValueError as exc:  # torchvision: unknown name, or a kwarg value it rejects
        raise InputError(f"model {label!r} with kwargs {kwargs}: {exc}") from None


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """The recipe's model, with its checkpoint loaded if it names one."""
    model = build_model(spec.model_dump(include={"builtin", "torchvision", "kwargs"}))
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model` strictly; every mismatch is reported, nothing is half-loaded."""
    path = Path(path)
    state = _unwrap(path, _read_checkpoint(path))
    state = _strip_prefixes(state)
    expected = model.state_dict()
    _fill_tied(state, expected)

    problems: list[str] = []
    problems += [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(
            f"{path}: checkpoint does not match the model: {len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}: {shown}{more}"
        )
    model.load_state_dict(state, strict=True)


def _read_checkpoint(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read safetensors checkpoint ({exc})") from None
    if suffix in (".pt", ".pth"):
        _check_archive(path)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
            if found is None and "Unsupported global" not in str(exc):
                raise InputError(
                    f"{path}: not a readable PyTorch checkpoint (corrupt or another format)"
                ) from None
            what = f" (e.g. {found.group(1)})" if found else ""
            raise InputError(
                f"{path}: the file holds more than tensors{what}, and compresspipe never unpickles Python "
                "objects; re-save it as a state_dict (torch.save(model.state_dict(), path)) or as .safetensors"
            ) from None
        except Exception as exc:  # the restricted unpickler fails in many ways on a corrupt file
            raise InputError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    raise InputError(f"{path}: checkpoint must be .safetensors, .pt or .pth (got {suffix or 'no extension'})")


def _check_archive(path: Path) -> None:
    """A .pt zip archive whose entries expand far beyond the file (a deflate bomb) is refused before reading.

    torch.save stores its entries uncompressed, so a real checkpoint expands to about its own size.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy (non-zip) format has no compression
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable checkpoint archive ({exc})") from None
    size = path.stat().st_size
    if expanded > 2 * size + 2**20:
        raise InputError(f"{path}: its entries expand to {expanded} bytes from a {size}-byte file (torch.save "
                         "stores tensors uncompressed); refusing a compressed archive")


def _unwrap(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict or a training checkpoint holding one under "state_dict" or "model"."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{path}: expected a state_dict (names to tensors), or a dict holding one under "
            f"'state_dict' or 'model' (got {type(obj).__name__})"
        )
    return {str(k): v for k, v in obj.items()}


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _fill_tied(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """safetensors drops duplicates of tied weights on save; restore them from the kept name."""
    groups: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for k, v in expected.items():
        if v.numel() > 0:
            groups.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride())), []).append(k)
    for names in groups.values():
        present = [k for k in names if k in state]
        if present:
            for k in names:
                state.setdefault(k, state[present[0]])
