"""`compresspipe plan`: a dry run. Resolves selectors, predicts params and MACs without training,
and warns about recipes that cannot deliver what they look like. Changes no weights, writes no run folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from compresspipe.artifacts.model import ModelState
from compresspipe.cache import scratch_dir
from compresspipe.errors import CompressPipeError, StageError
from compresspipe.metrics import count_macs, count_params
from compresspipe.recipe.spec import Recipe
from compresspipe.report.build import deploy_summary
from compresspipe.run.setup import RunSetup, prepare, reference_name
from compresspipe.stages.context import StageContext
from compresspipe.ui import UI, library_messages

MIN_CALIBRATION_SAMPLES = 128  # fewer samples than this give noisy activation ranges


def recipe_warnings(recipe: Recipe) -> list[dict[str, str]]:
    """Recipes that run but cannot deliver what they look like."""
    out: list[dict[str, str]] = []
    stages = recipe.stages

    def warn(stage: Any, message: str) -> None:
        out.append({"stage": str(stage.name) if stage is not None else "", "message": message})

    types = [s.type for s in stages]
    for i, s in enumerate(stages):
        later = types[i + 1:]
        if s.type == "prune" and getattr(s, "method", None) == "magnitude":
            warn(s, "unstructured (magnitude) pruning only zeroes weights: no smaller model and no speedup "
                    "expected" + (", and the export keeps dense weights unless it stores sparsity" if "export" in later
                                  else "") + "; use method: structured to shrink layers")
        if s.type == "distill":
            teacher = getattr(s, "teacher", None)
            trained_before = any(t in ("train", "distill") for t in types[:i])
            if teacher == "baseline" and not trained_before and recipe.model.checkpoint is None:
                warn(s, "distills from the baseline, but nothing trained it (no train stage before, no checkpoint): "
                        "the teacher is a random network")
        calib = getattr(s, "calibration", None)
        batches = getattr(calib, "batches", None)
        if s.type == "quantize" and getattr(s, "method", None) in ("static", "qat") and batches:
            samples = min(recipe.data.calibration_samples, batches * recipe.data.eval_batch_size)
            if samples < MIN_CALIBRATION_SAMPLES:
                warn(s, f"static quantization calibrates on {samples} samples: activation ranges will be noisy; "
                        f"use at least {MIN_CALIBRATION_SAMPLES} (calibration.batches x data.eval_batch_size, "
                        "up to data.calibration_samples)")
    return out


def replay_plans(recipe: Recipe, setup: RunSetup, state: ModelState,
                 preflight: UI | None = None) -> list[dict[str, Any]]:
    """Every stage's plan in order on the untrained model: selectors, ranks, shapes and stage order checked.

    A stage that finds its configuration cannot apply raises StageConfigError here, before anything ran. A plan
    that fails otherwise is exit 3 for `plan`; in the run's preflight (`preflight`: the run's UI) it is a warning,
    and that stage and those after it run unchecked (where the stage fails, error.log keeps the traceback)."""
    rows: list[dict[str, Any]] = []
    ui = UI(quiet=True)
    planned = {"baseline": state}
    tmp = scratch_dir("plan")  # removed below; after a SIGKILL, by the next process
    try:
        for i, (cfg, stage) in enumerate(zip(recipe.stages, setup.stages, strict=True), start=1):
            ctx = StageContext(recipe=recipe, index=i, name=str(cfg.name), stage_dir=Path(tmp), device=setup.device,
                               seed=recipe.seed + i, data=setup.data, ui=ui, reference=reference_name(recipe),
                               planned=dict(planned), preflight=preflight is not None)
            try:
                prediction = stage.plan(state.clone(), ctx)
            except CompressPipeError:
                raise
            except Exception as exc:  # a plan that breaks is not a verdict on the recipe
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
                if preflight is None:
                    raise StageError(str(cfg.name), f"its plan could not be made ({why})") from exc
                preflight.log(f"[bold yellow]warning:[/] stage {cfg.name}'s plan could not be checked before the run "
                              f"({escape(why)}); it and the stages after it run unchecked")
                return rows
            row: dict[str, Any] = {"index": i, "name": cfg.name, "type": cfg.type, "predicted": prediction is not None,
                                   "layers": {}, "notes": []}
            if prediction is not None:
                if prediction.state is not None:
                    state = prediction.state
                row["layers"] = prediction.layers
                row["notes"] = prediction.notes
            if preflight is None:  # the figures `plan` shows; the preflight only checks
                row["params"] = count_params(state.module) if prediction is not None else None
                row["macs"] = count_macs(state.module, state.spec) if prediction is not None else None
            rows.append(row)
            planned[str(cfg.name)] = state
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def preflight(recipe: Recipe, setup: RunSetup, ui: UI) -> None:
    """What `run` checks before it writes anything: the plan of every stage (exit 2 on a config error)."""
    replay_plans(recipe, setup, setup.baseline(), preflight=ui)


def plan_recipe(recipe: Recipe) -> dict[str, Any]:
    heard: list[str] = []  # library warnings while the model is built and planned: the baseline row's notes
    with library_messages(heard):
        setup = prepare(recipe, fingerprint=False)
        state = setup.baseline()
    rows: list[dict[str, Any]] = [{"index": 0, "name": "baseline", "type": "baseline", "predicted": True,
                                   "params": count_params(state.module),
                                   "macs": count_macs(state.module, state.spec), "layers": {}, "notes": heard}]
    with library_messages(heard):
        rows += replay_plans(recipe, setup, state)
    return {"format": "compresspipe.plan", "version": 1, "recipe": recipe.name, "stages": rows,
            "deploy": deploy_summary(recipe), "warnings": recipe_warnings(recipe)}
