"""Helpers for benchmarks: run a recipe given as a dict, and time models side by side."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import yaml


def run_recipe_dict(recipe: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """Run a recipe (as plain data) into a temporary folder; return report.json's content."""
    from compresspipe.recipe import load_recipe
    from compresspipe.run.executor import RunOptions, run_recipe
    from compresspipe.ui import UI

    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-")) if folder is None else folder
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    parsed = load_recipe(path)
    silent = UI(quiet=True, stream=io.StringIO())
    return run_recipe(parsed, path, RunOptions(out=tmp / "run", force=True), silent).report


def stage(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["stages"] if s["name"] == name)


def paired_latency(reference: Any, new: Any, shape: tuple[int, ...], batch: int, rounds: int = 7,
                   iters: int = 40, warmup: int = 5) -> tuple[float, float, float]:
    """(reference ms, new ms, reference/new): medians over interleaved rounds, one thread, so load on
    the machine hits both models alike."""
    import statistics

    from compresspipe.metrics import measure_latency

    ref_ms, new_ms = [], []
    for _ in range(rounds):
        ref_ms.append(measure_latency(reference, shape, [batch], warmup=warmup, iters=iters, threads=1)[batch])
        new_ms.append(measure_latency(new, shape, [batch], warmup=warmup, iters=iters, threads=1)[batch])
    a, b = statistics.median(ref_ms), statistics.median(new_ms)
    return a, b, a / b
