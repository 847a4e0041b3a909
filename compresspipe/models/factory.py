"""Build a model from its source (registry name, torchvision, timm, Hugging Face config, or the user's own
Python file) and load local weights.

Checkpoints are read without unpickling: safetensors, or a .pt/.pth/.bin state_dict under
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


SOURCE_KEYS = ("builtin", "torchvision", "timm", "huggingface", "python", "sha256", "kwargs")


def check_source(source: Any, allow_code: bool = False) -> dict[str, Any]:
    """A model source (from a recipe or a model.json) checked by the recipe's own rules: one known name, plain
    JSON kwargs, nothing that would download weights or run remote code, and a python file only when code is
    allowed (`allow_code`, or `models.code.allowing_code()`). Returns it as plain data."""
    from pydantic import ValidationError

    from compresspipe.recipe.spec import ModelSpec

    if not isinstance(source, Mapping):
        raise InputError(f"a model source must be an object (got {type(source).__name__})")
    extra = sorted(set(source) - set(SOURCE_KEYS))
    if extra:
        raise InputError(f"unknown key(s) {', '.join(map(repr, extra))} in a model source; allowed: "
                         f"{', '.join(SOURCE_KEYS)}")
    try:
        spec = ModelSpec.model_validate(dict(source), context={"check_paths": False, "allow_code": allow_code})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-")) or "(source)"
        raise InputError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    return spec.model_dump(mode="json", include=set(SOURCE_KEYS), exclude_none=True)


def build_model(source: Mapping[str, Any], task: str = "classification") -> nn.Module:
    """A freshly initialised model from a source ``{"builtin" | "torchvision" | "timm" | "huggingface" | "python":
    ..., "kwargs": {...}}`` (a recipe's model block works too: its other keys are not the source's). `task` picks
    a Hugging Face model's Auto class."""
    source = check_source({k: v for k, v in source.items() if k in SOURCE_KEYS})
    kwargs = dict(source.get("kwargs") or {})
    factory: Any
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

    elif source.get("timm"):
        import timm

        name = str(source["timm"])
        label = f"timm:{name}"

        def factory(**kw: Any) -> nn.Module:
            return timm.create_model(name, pretrained=False, **kw)

    elif source.get("huggingface") is not None:
        from compresspipe.models import hf

        return hf.build(source["huggingface"], kwargs, task)
    elif source.get("python"):
        return _build_python(str(source["python"]), source.get("sha256"), kwargs)
    else:
        raise InputError("a model source needs one of builtin, torchvision, timm, huggingface or python")
    try:
        return factory(**kwargs)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise InputError(f"model {label!r} does not accept kwargs {kwargs}: {exc}") from None
    except (ValueError, RuntimeError) as exc:  # unknown name, or a kwarg value the library rejects
        raise InputError(f"model {label!r} with kwargs {kwargs}: {exc}") from None


def _build_python(ref: str, sha256: str | None, kwargs: dict[str, Any]) -> nn.Module:
    from compresspipe.models.code import load_factory, split_ref

    path_text, name = split_ref(ref)
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"python model file not found: {path}")
    try:
        factory = load_factory(path, name, sha256)
    except (PermissionError, ValueError, AttributeError) as exc:
        raise InputError(str(exc)) from None
    except Exception as exc:  # the user's module failed to import: say where, not a traceback of ours
        raise InputError(f"{path}: importing it failed ({type(exc).__name__}: {exc})") from None
    try:
        module = factory(**kwargs)
    except Exception as exc:  # the user's factory: name it and what it raised
        raise InputError(f"{ref} with kwargs {kwargs} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise InputError(f"{ref} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def recorded_source(spec: ModelSpec, task: str = "classification", num_classes: int | None = None,
                    classes: list[str] | None = None) -> dict[str, Any]:
    """The source an artifact records for a recipe's model block: a Hugging Face folder becomes its full config
    (label count and names from the data where the config does not fix them; the artifact then needs no folder),
    a Python file gets its sha256 (a changed file is refused on reload)."""
    source = spec.model_dump(mode="json", include=set(SOURCE_KEYS), exclude_none=True)
    if spec.huggingface is not None:
        from compresspipe.models import hf

        config = hf.resolve_config(spec.huggingface if isinstance(spec.huggingface, str) else source["huggingface"],
                                   spec.kwargs, task, num_classes, classes)
        source = {"huggingface": {"config": config}}
    if spec.python is not None:
        from compresspipe.models.code import file_sha256, split_ref

        path = Path(split_ref(spec.python)[0])
        actual = file_sha256(path)
        if spec.sha256 is not None and actual != spec.sha256:
            raise InputError(f"model.sha256 pins {path} to {spec.sha256[:12]}..., but the file now has "
                             f"{actual[:12]}...: it changed; update the pin or restore the file")
        source["sha256"] = actual
    return check_source(source)


def build_from_spec(spec: ModelSpec, task: str = "classification", num_classes: int | None = None,
                    classes: list[str] | None = None) -> nn.Module:
    """The model a recipe's model block describes, with a Hugging Face folder's weights and its checkpoint
    loaded."""
    return build_recorded(spec, recorded_source(spec, task, num_classes, classes), task)[0]


def build_recorded(spec: ModelSpec, source: dict[str, Any], task: str) -> tuple[nn.Module, list[str]]:
    """(the model built from its recorded source, with the spec's weights loaded; notes about the weights)."""
    model = build_model(source, task)
    notes: list[str] = []
    if isinstance(spec.huggingface, str):
        from compresspipe.models import hf

        notes = hf.load_folder_weights(model, Path(spec.huggingface))  # type: ignore[arg-type]
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint)
    return model, notes


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as a flat state_dict (wrapper prefixes removed), read without unpickling objects."""
    path = Path(path)
    return _strip_prefixes(_unwrap(path, _read_checkpoint(path)))


def check_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Every mismatch between a state_dict and the model, at once: names, shapes, and kinds of dtype (an int, bool
    or complex tensor is never cast to float, nor a float one to int)."""
    expected = model.state_dict()
    _fill_tied(state, expected)
    problems: list[str] = []
    problems += [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    for k, v in expected.items():
        if k not in state:
            continue
        if tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}")
        elif _dtype_kind(state[k].dtype) != _dtype_kind(v.dtype):
            problems.append(f"dtype of {k}: checkpoint {str(state[k].dtype).removeprefix('torch.')}, model "
                            f"{str(v.dtype).removeprefix('torch.')} (not cast silently)")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(
            f"{path}: checkpoint does not match the model: {len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}: {shown}{more}"
        )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model` strictly; every mismatch is reported, nothing is half-loaded.

    A Hugging Face model (`HFModel`) also takes the transformers model's own keys (without the wrapper's
    "model." prefix)."""
    state = read_state(path)
    from compresspipe.models.hf import HFModel

    if isinstance(model, HFModel) and state and not all(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    check_state(model, state, path)
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
    if suffix in (".pt", ".pth", ".bin"):
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
    raise InputError(f"{path}: checkpoint must be .safetensors, .pt, .pth or .bin (got {suffix or 'no extension'})")


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
