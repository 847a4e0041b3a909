"""Tiny recipes and models shared by the tests (one place, not copied per file)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# Small enough for a whole run in a couple of seconds on 2 cores.
TINY_RECIPE: dict[str, Any] = {
    "compresspipe": 1,
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 32}, "input_shape": [1, 8, 8]},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2, "max_samples": 600},
    "evaluate": {"latency": {"batch_sizes": [1, 8], "warmup": 1, "iters": 3, "threads": 1}},
    "stages": [{"type": "train", "epochs": 2, "lr": 3.0e-3}],
}


def tiny_recipe(**changes: Any) -> dict[str, Any]:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe.update(changes)
    return recipe


def write_recipe(folder: Path, data: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def install_plugin(folder: Path, module: str, code: str, entry_points: str) -> dict[str, str]:
    """A plugin package on disk (module + dist-info with entry points); returns the env to see it."""
    import os

    (folder / f"{module}.py").write_text(code)
    dist = folder / f"{module}-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    env = {k: v for k, v in os.environ.items() if k != "COMPRESSPIPE_NO_PLUGINS"}
    env["PYTHONPATH"] = str(folder)
    return env
