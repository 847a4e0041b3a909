"""A finished stage's folder: metrics.json and a manifest of every file, then an atomic rename into place.

A stage writes into `.NN-name.partial/`; only a complete folder, whose manifest lists the sha256 of every
file it holds and every file a stage folder must hold, is renamed to `NN-name/`. Resume trusts a folder whose
manifest matches its files; a reader never sees half a stage.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from compresspipe.artifacts.files import atomic_write_json, read_json, sha256_file
from compresspipe.artifacts.model import MODEL_FILE, WEIGHTS_FILE
from compresspipe.errors import ArtifactError

METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "compresspipe.manifest"
METRICS_FORMAT = "compresspipe.metrics"
REQUIRED = (WEIGHTS_FILE, MODEL_FILE, METRICS_FILE)


def finish(partial: Path, final: Path, metrics: dict[str, Any], required: list[str] | None = None) -> None:
    """Write metrics.json and the manifest into `partial`, check every required file is there, move it to `final`."""
    atomic_write_json(partial / METRICS_FILE, {"format": METRICS_FORMAT, **metrics})
    files = {p.relative_to(partial).as_posix(): p for p in sorted(partial.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(partial).parts)}
    missing = [f for f in (*REQUIRED, *(required or [])) if f not in files]
    if missing:
        raise ArtifactError(f"{partial}: a stage folder must hold {', '.join(missing)}")
    manifest = {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in files.items()}
    atomic_write_json(partial / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "version": 1, "files": manifest,
                                                "required": sorted({*REQUIRED, *(required or [])})})
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def intact(folder: Path) -> bool:
    """Whether a stage folder is complete: its manifest lists every required file and every file matches."""
    try:
        manifest = read_json(folder / MANIFEST_FILE)
        files = manifest["files"]
        required = set(manifest.get("required") or REQUIRED) | set(REQUIRED)
        if not isinstance(files, dict) or not required <= set(files):
            return False
        return all(isinstance(name, str) and ".." not in Path(name).parts and (folder / name).is_file()
                   and sha256_file(folder / name) == info["sha256"] for name, info in files.items())
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False


def read_metrics(folder: Path) -> dict[str, Any]:
    try:
        data = read_json(folder / METRICS_FILE)
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{folder / METRICS_FILE}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{folder / METRICS_FILE}: not a metrics object")
    return data
