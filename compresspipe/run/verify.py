"""`compresspipe verify RUN_DIR`: prove a run's files are intact and, unless `fast`, that the run reproduces.

Fast: every stage folder's files match its manifest (an edited weight file is caught, naming the stage), and
the lock file's recipe still validates and matches run.json's. Full: the locked recipe is also re-run, and per
stage the re-run's metrics must match within tolerances and, where the run is deterministic (CPU), the weights
bit for bit (same sha256).

A run folder whose own files are broken or tampered (lock, report, manifests) is an `ArtifactError` (exit 2,
the files are broken); a run that does not reproduce is a result with ok false (exit 1).
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresspipe.artifacts.files import read_json, sha256_file
from compresspipe.artifacts.stage_folder import MANIFEST_FILE
from compresspipe.errors import ArtifactError, GateFailed, RecipeError
from compresspipe.recipe.yamlio import parse_yaml_text, read_text_file

EXACT = ("params", "nonzero_params", "macs", "bytes")


@dataclass
class Tolerances:
    accuracy: float = 1e-9  # absolute; CPU runs are deterministic, so this is a bit-for-bit check
    loss: float = 1e-6


def _object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable {what} ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: not a {what} (its top level is not an object)")
    return data


def _manifest_problems(folder: Path) -> list[str]:
    """What differs between a stage folder and its manifest (empty: intact)."""
    if not (folder / MANIFEST_FILE).is_file():
        return [f"{MANIFEST_FILE} missing"]
    files = _object(folder / MANIFEST_FILE, "stage manifest").get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{folder / MANIFEST_FILE}: 'files' must map file names to their sha256")
    problems = []
    for name, info in files.items():
        if not isinstance(name, str) or ".." in Path(name).parts or Path(name).is_absolute():
            raise ArtifactError(f"{folder / MANIFEST_FILE}: file name {name!r} points outside the stage folder")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise ArtifactError(f"{folder / MANIFEST_FILE}: files.{name}: needs a sha256")
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{name} was modified (sha256 differs from the manifest)")
    return problems


def _stage_rows(report: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    rows = report.get("stages")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                             and isinstance(r.get("folder"), str) for r in rows):
        raise ArtifactError(f"{path}: 'stages' must be a list of rows, each with a name and a folder")
    for r in rows:
        if "/" in r["folder"] or r["folder"] in ("", ".", ".."):
            raise ArtifactError(f"{path}: stage folder {r['folder']!r} is not a folder name")
    return rows


def read_run(run_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(the locked recipe, the lock, the report) of a finished run; ArtifactError when a file is broken."""
    from compresspipe.recipe.loader import validate_recipe_data

    lock_path, report_path = run_dir / "recipe.lock.yaml", run_dir / "report.json"
    for p in (lock_path, report_path):
        if not p.is_file():
            raise ArtifactError(f"{run_dir}: not a finished compresspipe run ({p.name} missing)")
    try:
        lock = parse_yaml_text(read_text_file(lock_path, "lock"), str(lock_path)).data
    except RecipeError as exc:
        raise ArtifactError(f"{lock_path}: not a readable lock file: {exc}") from None
    if not isinstance(lock, dict) or lock.get("format") != "compresspipe.lock":
        raise ArtifactError(f"{lock_path}: not a compresspipe lock file")
    try:
        recipe = validate_recipe_data(lock.get("recipe"), check_paths=False)
    except RecipeError as exc:
        raise ArtifactError(f"{lock_path}: the locked recipe does not validate:\n{exc}") from None
    report = _object(report_path, "report")
    if report.get("format") != "compresspipe.report":
        raise ArtifactError(f"{report_path}: not a compresspipe report")
    _stage_rows(report, report_path)
    return recipe, lock, report


def verify_run(run_dir: Path, tol: Tolerances | None = None, keep: Path | None = None,
               fast: bool = False) -> dict[str, Any]:
    recipe, lock, original = read_run(run_dir)
    if fast:
        return _check_files(run_dir, recipe, lock, original)
    tol = tol or Tolerances()
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="compresspipe-verify-") as tmp:
            return _compare(run_dir, recipe, lock, original, Path(tmp), tol)
    return _compare(run_dir, recipe, lock, original, keep, tol)


def _check_files(run_dir: Path, recipe: Any, lock: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Files against manifests, the lock against run.json: no training, seconds."""
    from compresspipe.artifacts.files import sha256_json

    rows = []
    state_file = run_dir / "run.json"
    run_problems = []
    if lock.get("recipe_sha256") != sha256_json(recipe.to_data()):
        run_problems.append("recipe.lock.yaml's recipe does not match its recorded sha256")
    if state_file.is_file() and _object(state_file, "run state").get("recipe") != lock.get("recipe"):
        run_problems.append("run.json and recipe.lock.yaml describe different recipes")
    run_problems += _code_problems(recipe, lock)
    for row in _stage_rows(report, run_dir / "report.json"):
        problems = _manifest_problems(run_dir / row["folder"])
        files = row.get("files") or []
        detail = f"{len(files)} shipped file(s) intact" if not problems else ""
        rows.append({"stage": row["name"], "ok": not problems, "problems": problems, "details": detail,
                     "accuracy": row.get("accuracy"), "rerun_accuracy": None})
    ok = all(r["ok"] for r in rows) and not run_problems
    return {"run": str(run_dir), "mode": "fast", "deterministic": None, "ok": ok, "problems": run_problems,
            "stages": rows}


def _code_problems(recipe: Any, lock: dict[str, Any]) -> list[str]:
    """A `python:` model's file must be the code the run was made from (its sha256 in the lock): hashing reads the
    file and runs nothing, so this holds with or without --allow-code."""
    from compresspipe.models.code import file_sha256, split_ref

    recorded = (lock.get("inputs") or {}).get("model_code")
    python = getattr(recipe.model, "python", None)
    if not recorded or not python:
        return []
    path = Path(split_ref(python)[0])
    if not path.is_file():
        return [f"the model's code {path} is missing (the run was made from sha256 {str(recorded)[:12]}...)"]
    actual = file_sha256(path)
    if actual != recorded:
        return [f"the model's code {path} changed since the run (sha256 {str(recorded)[:12]}... then, {actual[:12]}... "
                "now): the run's models were not made by this code"]
    return []


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
    for old in _stage_rows(original, run_dir / "report.json"):
        folder = run_dir / old["folder"]
        problems = _manifest_problems(folder)
        new = new_rows.get(old["name"])
        checked: list[str] = []
        if new is None:
            problems.append("stage missing from the re-run")
        else:
            for key in EXACT:
                if old.get(key) != new.get(key):
                    problems.append(f"{key} {old.get(key)} -> {new.get(key)}")
            checked.append("params, MACs, bytes equal")
            for key, limit in (("accuracy", tol.accuracy), ("loss", tol.loss)):
                a, b = old.get(key), new.get(key)
                if isinstance(a, float) and isinstance(b, float) and abs(a - b) > limit:
                    problems.append(f"{key} {a:.6f} -> {b:.6f} (tolerance {limit:g})")
            checked.append(f"accuracy within {tol.accuracy:g}")
            manifest = folder / MANIFEST_FILE
            if deterministic and manifest.is_file():
                old_hash = (_object(manifest, "stage manifest").get("files") or {}).get("model.safetensors", {})
                new_hash = sha256_file(out / "rerun" / new["folder"] / "model.safetensors")
                if not isinstance(old_hash, dict) or old_hash.get("sha256") != new_hash:
                    problems.append("weights differ from the re-run (model.safetensors sha256)")
                else:
                    checked.append("weights bit-identical")
        rows.append({"stage": old["name"], "ok": not problems, "problems": problems,
                     "details": "; ".join(checked) if not problems else "",
                     "accuracy": old.get("accuracy"), "rerun_accuracy": None if new is None else new.get("accuracy")})
    return {"run": str(run_dir), "mode": "full", "deterministic": deterministic, "ok": all(r["ok"] for r in rows),
            "problems": [], "stages": rows}
