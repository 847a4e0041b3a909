"""`compresspipe verify RUN_DIR`: re-run the locked recipe and prove the run reproduces.

Checks, per stage: the files on disk still match their manifest (an edited weight file is caught),
the re-run's metrics match within tolerances, and, where the run is deterministic (CPU), the weights
are bit-identical (same sha256).
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compresspipe.artifacts.files import read_json, sha256_file
from compresspipe.errors import GateFailed, InputError, RecipeError

EXACT = ("params", "nonzero_params", "macs", "bytes")


@dataclass
class Tolerances:
    accuracy: float = 1e-9  # absolute; CPU runs are deterministic, so this is a bit-for-bit check
    loss: float = 1e-6


def _manifest_problems(folder: Path) -> list[str]:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return ["manifest.json missing"]
    problems = []
    for name, info in read_json(manifest)["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{name} was modified (sha256 differs from manifest)")
    return problems


def verify_run(run_dir: Path, tol: Tolerances | None = None, keep: Path | None = None) -> dict[str, Any]:
    from compresspipe.recipe.loader import validate_recipe_data

    tol = tol or Tolerances()
    lock_path = run_dir / "recipe.lock.yaml"
    report_path = run_dir / "report.json"
    for p in (lock_path, report_path):
        if not p.is_file():
            raise InputError(f"{run_dir}: not a finished compresspipe run ({p.name} missing)")
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))
    if not isinstance(lock, dict) or lock.get("format") != "compresspipe.lock":
        raise InputError(f"{lock_path}: not a compresspipe lock file")
    try:
        recipe = validate_recipe_data(lock["recipe"])
    except RecipeError as exc:
        raise InputError(f"{lock_path}: the locked recipe no longer validates:\n{exc}") from None
    original = read_json(report_path)
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="compresspipe-verify-") as tmp:
            return _compare(run_dir, recipe, lock, original, Path(tmp), tol)
    return _compare(run_dir, recipe, lock, original, keep, tol)


def _compare(run_dir: Path, recipe: Any, lock: dict, original: dict, out: Path, tol: Tolerances) -> dict[str, Any]:
    import torch

    from compresspipe.run.executor import RunOptions, run_recipe
    from compresspipe.ui import UI

    previous = torch.get_num_threads()
    threads = lock.get("torch_threads")
    if isinstance(threads, int) and threads > 0:
        torch.set_num_threads(threads)  # the run's own thread count: CPU training is bit-exact only with it
    try:
        rerun = run_recipe(recipe, None, RunOptions(out=out / "rerun", force=True),
                           UI(quiet=True, stream=io.StringIO())).report
    except GateFailed as exc:  # reproducing a run that missed its gates is still a reproduction
        rerun = exc.report or {"stages": []}
    finally:
        torch.set_num_threads(previous)
    deterministic = str(lock.get("device", "cpu")) == "cpu"
    rows = []
    new_rows = {s["name"]: s for s in rerun["stages"]}
    for old in original["stages"]:
        folder = run_dir / old["folder"]
        problems = _manifest_problems(folder)
        new = new_rows.get(old["name"])
        if new is None:
            problems.append("stage missing from the re-run")
        else:
            for key in EXACT:
                if old.get(key) != new.get(key):
                    problems.append(f"{key} {old.get(key)} -> {new.get(key)}")
            for key, limit in (("accuracy", tol.accuracy), ("loss", tol.loss)):
                a, b = old.get(key), new.get(key)
                if a is not None and b is not None and abs(a - b) > limit:
                    problems.append(f"{key} {a:.6f} -> {b:.6f} (tolerance {limit:g})")
            old_manifest = folder / "manifest.json"
            if deterministic and old_manifest.is_file():
                old_hash = read_json(old_manifest)["files"].get("model.safetensors", {}).get("sha256")
                new_hash = sha256_file(out / "rerun" / new["folder"] / "model.safetensors")
                if old_hash != new_hash:
                    problems.append("weights differ from the re-run (model.safetensors sha256)")
        rows.append({"stage": old["name"], "ok": not problems, "problems": problems,
                     "accuracy": old.get("accuracy"), "rerun_accuracy": None if new is None else new.get("accuracy")})
    return {"run": str(run_dir), "deterministic": deterministic, "ok": all(r["ok"] for r in rows), "stages": rows}
