"""The names timm and transformers know, read from the installed libraries, so that recipes are checked against
the versions that will build them: timm's architectures (`timm.list_models()`), transformers' model types and the
model types each Auto class covers (its `MODEL_FOR_*_MAPPING_NAMES`).

Both libraries import torch, which recipe validation must not: in a process that has not imported torch the names
are read once in a child process and kept as JSON under the compresspipe cache (COMPRESSPIPE_CACHE, default
~/.cache/compresspipe), keyed by the library's version, so another version is read afresh; a process that already
imported torch reads them directly. Nothing here is kept by hand.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from compresspipe.cache import cache_root

# compresspipe task -> the transformers Auto-class mapping whose model types can run it
HF_TASK_MAPPINGS = {
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "image_classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "language_modeling": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}


def installed_version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cache_file(library: str, version: str) -> Path:
    return cache_root() / "names" / f"{library}-{version}.json"


@functools.cache
def names(library: str) -> dict[str, frozenset[str]]:
    """{group: names} of the installed `library` ("timm": models; "transformers": model_types and one group per
    task of HF_TASK_MAPPINGS). ValueError (a recipe error at the key that named it) when it is not installed or
    cannot be read."""
    version = installed_version(library)
    if version is None:
        extra = "huggingface" if library == "transformers" else library
        raise ValueError(f"{library} is not installed (pip install 'compresspipe[{extra}]')")
    path = _cache_file(library, version)
    data: Any = None
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None  # a torn file: read the library again
    if not _well_formed(data, library):  # missing, torn or edited
        data = _read(library)
        try:  # whole or not at all: other processes may read it at once
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f".{path.name}.{os.getpid()}")
            part.write_text(json.dumps(data), encoding="utf-8")
            os.replace(part, path)
        except OSError:
            pass  # a read-only home: the names are still right, only not kept
    return {group: frozenset(values) for group, values in data.items()}


def _groups(library: str) -> set[str]:
    return {"models"} if library == "timm" else {"model_types", *HF_TASK_MAPPINGS}


def _well_formed(data: object, library: str) -> bool:
    """Every group the checks read, each a list of names (a file edited by hand is read afresh)."""
    return isinstance(data, dict) and set(data) == _groups(library) and all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values())


def _read(library: str) -> dict[str, list[str]]:
    if "torch" in sys.modules:  # importing the library costs this process little more
        return read_here(library)
    code = f"import json; from compresspipe.models.library_names import read_here; print(json.dumps(read_here({library!r})))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"could not read the names {library} knows ({type(exc).__name__}: {exc})") from None
    try:
        data = json.loads((done.stdout.strip().splitlines() or [""])[-1])
    except ValueError:
        data = None
    if done.returncode != 0 or not _well_formed(data, library):
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ValueError(f"could not read the names {library} knows ({why[:200]})")
    return data


def read_here(library: str) -> dict[str, list[str]]:
    """The names, from the library imported in this process (imports torch)."""
    if library == "timm":
        import timm

        return {"models": sorted(timm.list_models())}
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return {"model_types": sorted(CONFIG_MAPPING_NAMES),
            **{task: sorted(getattr(modeling_auto, mapping)) for task, mapping in HF_TASK_MAPPINGS.items()}}
