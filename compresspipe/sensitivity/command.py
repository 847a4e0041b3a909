"""`compresspipe sensitivity`: the model as it enters a stage, each of that stage's layers changed alone, one-shot.

The model entering the stage comes from running the stages before it, as an ordinary run into `<out>/run/`
(kept, and reused when the recipe is the same up to there). `--workers N` splits the layers among N processes
(each rebuilds the data from the recipe and loads the model from `<out>/model/`, safetensors and JSON; their
results come back as JSON files and through the curve cache).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresspipe.artifacts.files import atomic_write_json, atomic_write_text, read_json
from compresspipe.errors import GateFailed, InputError
from compresspipe.registry import unknown_message
from compresspipe.sensitivity import SENSITIVE_STAGES

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.recipe.spec import Recipe
    from compresspipe.run.setup import RunSetup
    from compresspipe.stages.context import StageContext
    from compresspipe.ui import UI


def stage_index(recipe: Recipe, name: str | None) -> int:
    """1-based index of the stage to measure: `name`, else the first prune, quantize or factorize stage."""
    names = recipe.stage_names()
    if name is not None:
        if name not in names:
            raise InputError(unknown_message("stage", name, names))
        return names.index(name) + 1
    for i, cfg in enumerate(recipe.stages, start=1):
        if cfg.type in SENSITIVE_STAGES:
            return i
    raise InputError(f"the recipe has no {', '.join(SENSITIVE_STAGES)} stage to measure; name one with --stage")


def _entering_model(recipe: Recipe, recipe_path: Path | None, index: int, folder: Path,
                    ui: UI) -> tuple[ModelState, RunSetup, dict[str, Any]]:
    """The model stage `index` receives, its run setup, and the finished stages before it (as `history`)."""
    from compresspipe.artifacts.files import read_json as read
    from compresspipe.artifacts.model import load_model
    from compresspipe.run.executor import RunOptions, run_recipe
    from compresspipe.run.folder import stage_dirname
    from compresspipe.run.setup import prepare
    from compresspipe.stages.context import StageRecord

    setup = prepare(recipe)
    if index == 1:
        return setup.baseline(), setup, {}
    before = recipe.model_copy(update={"stages": recipe.stages[:index - 1], "gates": None, "search": None})
    run_dir = folder / "run"
    state_file = run_dir / "run.json"
    reuse = False
    if state_file.is_file():
        try:
            done = read(state_file)
            reuse = done.get("status") == "complete" and done.get("recipe") == before.to_data()
        except (OSError, ValueError):
            reuse = False
    if reuse:
        ui.log(f"using the finished run of the stages before it in {run_dir}")
    else:
        ui.log(f"running the {index - 1} stage(s) before it into {run_dir}")
        resume = _resumable(run_dir, before)
        # an expect: block of an earlier stage that misses still leaves the model the stage receives
        with contextlib.suppress(GateFailed):
            run_recipe(before, recipe_path, RunOptions(out=run_dir, resume=resume, force=not resume), ui)
    names = ["baseline", *before.stage_names()]
    history = {}
    for i, n in enumerate(names):
        folder_i = run_dir / stage_dirname(i, n)
        stype = "baseline" if i == 0 else before.stages[i - 1].type
        history[n] = StageRecord(i, n, stype, folder_i, read(folder_i / "metrics.json"))
    return load_model(run_dir / stage_dirname(len(names) - 1, names[-1])), setup, history


def _resumable(run_dir: Path, recipe: Recipe) -> bool:
    try:
        state = read_json(run_dir / "run.json")
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("recipe") == recipe.to_data()


def _context(recipe: Recipe, setup: RunSetup, index: int, folder: Path, ui: UI,
             history: dict[str, Any]) -> StageContext:
    from compresspipe.run.setup import reference_name
    from compresspipe.stages.context import StageContext

    scratch = folder / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return StageContext(recipe=recipe, index=index, name=str(recipe.stages[index - 1].name), stage_dir=scratch,
                        device=setup.device, seed=recipe.seed + index, data=setup.data, ui=ui, history=history,
                        reference=reference_name(recipe))


def run_sensitivity(recipe: Recipe, recipe_path: Path | None, stage: str | None, out: Path | None, workers: int,
                    ratios: list[float] | None, samples: int, use_cache: bool, ui: UI) -> dict[str, Any]:
    """Measure, write sensitivity.json and sensitivity.html into the output folder, and return the document."""
    import shutil

    from compresspipe.artifacts.model import save_model
    from compresspipe.sensitivity.measure import measure

    t0 = time.perf_counter()
    index = stage_index(recipe, stage)
    cfg = recipe.stages[index - 1]
    folder = (out or Path("runs") / f"{recipe.name}-sensitivity").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state, setup, history = _entering_model(recipe, recipe_path, index, folder, ui)
    impl = setup.stages[index - 1]
    settings = impl.sensitivity_settings(ratios)
    if settings is None:
        raise InputError(f"stage {cfg.name!r} ({cfg.type}) has no sensitivity to measure in this configuration "
                         "(magnitude pruning changes no size or speed; fp16/bf16 and backend onnxruntime quantize "
                         "nothing here)")
    ctx = _context(recipe, setup, index, folder, ui, history)
    layers = list(impl.sensitivity_layers(state, ctx))
    if not layers:
        raise InputError(f"stage {cfg.name!r} selects no layer whose sensitivity can be measured")
    parts: dict[str, list[dict[str, Any]]] = {}
    workers = max(1, min(workers, len(layers)))
    if workers > 1:
        model_dir = folder / "model"
        save_model(state, model_dir)
        parts = _parallel(recipe, index, model_dir, layers, settings, samples, use_cache, workers, folder,
                          history, ui)
    try:
        with ui.progress(f"sensitivity of {cfg.name}", len(layers)) as bar:
            doc = measure(impl, state, ctx, settings, samples, layers=layers, use_cache=use_cache,
                          progress=lambda name, hit: bar.advance(1, f"{name}{' (cached)' if hit else ''}"),
                          precomputed=parts)
    finally:
        shutil.rmtree(ctx.stage_dir, ignore_errors=True)
    doc.update(recipe=recipe.name, stage=cfg.name, type=cfg.type, workers=workers,
               seconds=round(time.perf_counter() - t0, 3), folder=str(folder))
    atomic_write_json(folder / "sensitivity.json", doc)
    atomic_write_text(folder / "sensitivity.html", render_html(doc))
    return doc


def _parallel(recipe: Recipe, index: int, model_dir: Path, layers: list[str], settings: dict[str, Any],
              samples: int, use_cache: bool, workers: int, folder: Path, history: dict[str, Any],
              ui: UI) -> dict[str, list[dict[str, Any]]]:
    """Measure slices of the layers in `workers` processes; their points by layer."""
    from compresspipe.errors import mark_interrupted
    from compresspipe.run.workers import child_env, stopped_by_signal

    threads = max(1, (os.cpu_count() or 1) // workers)
    env = child_env(threads)
    procs = []
    specs = []
    for i in range(workers):
        part = folder / f".part-{i}.json"
        part.unlink(missing_ok=True)
        spec = {"recipe": recipe.to_data(), "index": index, "model": str(model_dir), "layers": layers[i::workers],
                "settings": settings, "samples": samples, "use_cache": use_cache, "out": str(part),
                "threads": threads, "history": {n: str(r.folder) for n, r in history.items()}}
        path = folder / f".part-{i}.spec.json"
        atomic_write_json(path, spec)
        specs.append((path, part))
        procs.append(subprocess.Popen([sys.executable, "-m", "compresspipe.sensitivity.worker", str(path)], env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    ui.log(f"measuring {len(layers)} layer(s) in {workers} processes, {threads} thread(s) each")
    out: dict[str, list[dict[str, Any]]] = {}
    errors = []
    results = []
    try:
        for proc in procs:
            results.append(proc.communicate())
    except BaseException:  # Ctrl-C or SIGTERM here: the workers stop too (what they measured is in the cache)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for spec_path, part in specs:
            spec_path.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
        raise
    stopped = [n for n in map(stopped_by_signal, (p.returncode for p in procs)) if n is not None]
    if stopped:  # a worker was sent SIGTERM (or Ctrl-C) on its own: stop as if this process was (nothing is lost)
        for spec_path, part in specs:
            spec_path.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
        mark_interrupted(stopped[0])
        raise KeyboardInterrupt
    for proc, (spec_path, part), (_, err) in zip(procs, specs, results, strict=True):
        if proc.returncode != 0 or not part.is_file():
            errors.append(err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        else:
            out.update(json.loads(part.read_text(encoding="utf-8")))
        part.unlink(missing_ok=True)
        spec_path.unlink(missing_ok=True)
    if errors:
        raise InputError("a sensitivity worker failed: " + "; ".join(e[0] for e in errors))
    return out


def worker_main(spec_path: str) -> int:
    """One worker process: measure its slice of the layers, write {layer: points} as JSON; 128 + the signal when
    Ctrl-C or SIGTERM stops it (its scratch folder removed; what it measured is in the cache)."""
    from compresspipe.errors import interrupt_exit_code
    from compresspipe.run.workers import stop_on_signals

    stop_on_signals()
    try:
        return _worker(spec_path)
    except KeyboardInterrupt:
        return interrupt_exit_code()


def _worker(spec_path: str) -> int:
    import torch

    from compresspipe.artifacts.model import load_model
    from compresspipe.recipe.loader import validate_recipe_data
    from compresspipe.run.setup import prepare
    from compresspipe.sensitivity.measure import measure
    from compresspipe.stages.context import StageRecord
    from compresspipe.ui import UI

    spec = read_json(Path(spec_path))
    torch.set_num_threads(int(spec["threads"]))
    recipe = validate_recipe_data(spec["recipe"])
    setup = prepare(recipe, fingerprint=False)
    state = load_model(Path(spec["model"]))
    ui = UI(quiet=True, stream=io.StringIO())
    history = {n: StageRecord(i, n, "", Path(f), {}) for i, (n, f) in enumerate(spec["history"].items())}
    folder = Path(spec["out"]).parent / f".scratch-{os.getpid()}"
    ctx = _context(recipe, setup, int(spec["index"]), folder, ui, history)
    try:
        doc = measure(setup.stages[int(spec["index"]) - 1], state, ctx, spec["settings"], int(spec["samples"]),
                      layers=list(spec["layers"]), use_cache=bool(spec["use_cache"]))
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    atomic_write_json(Path(spec["out"]), {row["layer"]: row["points"] for row in doc["layers"]})
    return 0


def table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Terminal/markdown table: one row per layer, one column per setting: accuracy (drop in points)."""
    settings = []
    for row in doc["layers"]:
        for p in row["points"]:
            if p["setting"] not in settings:
                settings.append(p["setting"])
    header = ["layer", "type", *[str(s) for s in settings]]
    rows = []
    for row in doc["layers"]:
        by = {p["setting"]: p for p in row["points"]}
        cells = []
        for s in settings:
            p = by.get(s)
            if p is None or p.get("accuracy") is None:
                cells.append("skipped" if p is not None and p.get("skipped") else "")
            else:
                change = -100 * p["drop"]
                cells.append(f"{100 * p['accuracy']:.2f}% ({0.0 if abs(change) < 0.005 else change:+.2f})")
        coupled = row.get("coupled") or []
        name = row["layer"] + (f" (+{len(coupled)} coupled)" if coupled else "")
        rows.append([name, str(row.get("type", "")), *cells])
    return header, rows


def render_html(doc: dict[str, Any]) -> str:
    from compresspipe.report.html import line_plot, page
    from compresspipe.report.html import table as html_table

    settings = doc.get("settings") or {}
    base = doc["baseline"]["accuracy"]
    meta = (f"Stage {doc['stage']} ({doc['type']}, {settings.get('kind', '')}) of recipe {doc['recipe']}: each layer "
            f"changed alone, one-shot, without fine-tuning; accuracy on {doc['samples']} validation samples (the "
            f"unchanged model: {100 * base:.2f}%). {doc['measured_layers']} layer(s) measured, {doc['cached_layers']} "
            f"from the cache, in {doc['seconds']:.1f} s with {doc.get('workers', 1)} worker(s).")
    body = []
    numeric = all(isinstance(p["setting"], int | float) for r in doc["layers"] for p in r["points"])
    if numeric:
        series = [(r["layer"], [(float(p["setting"]), float(p["accuracy"])) for p in r["points"]
                                if p.get("accuracy") is not None]) for r in doc["layers"]]
        for start in range(0, len(series), 10):  # ten curves a plot stay readable
            chunk = series[start:start + 10]
            body += ["<figure>", line_plot(f"accuracy vs {settings.get('setting', 'setting')}",
                                           str(settings.get("setting", "setting")), "accuracy (%)", chunk),
                     "</figure>"]
    else:
        series = [("int8 alone", [(float(i), float(p["accuracy"])) for i, r in enumerate(doc["layers"])
                                  for p in r["points"] if p.get("accuracy") is not None])]
        body += ["<figure>", line_plot("accuracy with one layer quantized", "layer (table order)", "accuracy (%)",
                                       series), "</figure>"]
    header, rows = table(doc)
    body += ['<h2 id="layers">Layers</h2>', html_table(header, rows, {0, 1}),
             '<p class="meta">Cells: accuracy with that layer changed alone (change in points against the unchanged '
             'model). Coupled layers lose their channels with the named one (residual connections).</p>']
    return page(f"compresspipe sensitivity: {doc['recipe']} / {doc['stage']}", meta,
                ['<div class="plots">', *body[:-3], "</div>", *body[-3:]])
