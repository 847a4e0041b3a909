"""Run a validated recipe: the baseline, then each stage in order, a reloadable model after each, then the report.

The run folder is locked for the whole run (`run.folder`). Each stage's model is measured twice: as the PyTorch
model, and as the file the deploy runtime ships (`stages.ship`); after the last stage every shipped file is
timed, interleaved (`deploy.timer`). report.json is written on every exit: complete, failed or interrupted.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compresspipe.artifacts import stage_folder
from compresspipe.artifacts.files import atomic_write_json, atomic_write_text
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.deploy.timer import DeployTimer
from compresspipe.errors import CompressPipeError, GateFailed, InputError, RunStopped, StageError, interrupted
from compresspipe.metrics.measure import measure_model
from compresspipe.recipe.spec import Recipe, named_metrics
from compresspipe.recipe.yamlio import dump_yaml
from compresspipe.report.build import build_report, deploy_summary, render_markdown
from compresspipe.report.gates import describe_failures, evaluate_gates, write_junit
from compresspipe.report.html import render_html
from compresspipe.run.folder import RunFolder, stage_dirname
from compresspipe.run.plan import preflight
from compresspipe.run.setup import RunSetup, prepare, reference_name, seed_everything
from compresspipe.stages.base import StageResult
from compresspipe.stages.context import CHECKPOINTS, StageContext, StageRecord
from compresspipe.stages.ship import is_int8, primary_format, ship
from compresspipe.training.distributed import Dist, init_from_env, shutdown
from compresspipe.ui import UI, library_messages, strip_ansi


@dataclass
class RunOptions:
    out: Path | None = None
    resume: bool = False
    force: bool = False
    junit: Path | None = None
    # called with (stage name, the rows so far) after each stage, finished or resumed; it may raise RunStopped
    after_stage: Callable[[str, list[dict[str, Any]]], None] | None = None
    allow_code: bool = False  # --allow-code: a python: model's file may run (its sha256 is checked on every build)


@dataclass
class RunResult:
    folder: Path
    report: dict[str, Any]


CHANCE_FACTOR = 1.5  # a reference below 1.5x chance accuracy has not learned


class Executor:
    def __init__(self, recipe: Recipe, recipe_path: Path | None, options: RunOptions, ui: UI):
        self.recipe, self.recipe_path, self.options, self.ui = recipe, recipe_path, options, ui
        self.folder = RunFolder(options.out or Path("runs") / recipe.name)
        self.names = ["baseline", *recipe.stage_names()]
        self.dirnames = [stage_dirname(i, n) for i, n in enumerate(self.names)]
        self.reference = reference_name(recipe)
        self.rows: list[dict[str, Any]] = []
        self.dist = Dist()

    def run(self) -> RunResult:
        from compresspipe.models.code import allowing_code

        with allowing_code(self.options.allow_code):
            return self._run()

    def _run(self) -> RunResult:
        if self.options.junit is not None and self.options.junit.is_dir():
            raise InputError(f"--junit {self.options.junit}: is a folder; give a file name")
        self.early: list[str] = []  # library warnings before the first row: the baseline's notes
        with library_messages(self.early):
            setup = prepare(self.recipe)
        for note in setup.data.notes:
            self.ui.log(f"data: {note}")
        with self.ui.progress("checking every stage's plan on the model", None), library_messages(self.early):
            preflight(self.recipe, setup, self.ui)
        self.dist = init_from_env(setup.device)
        if not self.dist.is_main:  # only rank 0 prints and writes the run folder
            self.ui = UI(quiet=True, stream=io.StringIO())
            try:
                return self._stages(setup, self.dist.broadcast(None), {})
            finally:
                shutdown()
        lock = setup.lock(self.recipe_path)
        try:
            with self.folder:
                start, kept = self.folder.claim(lock, self.dirnames, self.options.resume, self.options.force)
                if kept:
                    self.ui.log(f"--force kept what no run wrote in {self.folder.path}: {', '.join(kept[:5])}")
                status, error = "interrupted", "interrupted before the first stage"
                try:
                    self.folder.write_state("running", lock, world_size=self.dist.world)
                    atomic_write_text(self.folder.path / "recipe.lock.yaml", dump_yaml(lock))
                    self.dist.broadcast(start)
                    if start:
                        self.ui.log(f"resuming {self.folder.path}: {start} finished stage(s) kept")
                    self._stages(setup, start, lock)
                    status = "complete"
                    return self._finish(setup, lock)
                except KeyboardInterrupt:
                    from compresspipe.errors import interruption

                    error = interruption()
                    raise
                except GateFailed:
                    status = "complete"
                    raise
                except RunStopped as exc:
                    status, error = "stopped", str(exc)
                    raise
                except BaseException as exc:
                    if interrupted():  # an error raised while Ctrl-C or SIGTERM unwinds (an import cut short)
                        from compresspipe.errors import interruption

                        error = interruption()
                        raise KeyboardInterrupt from exc
                    status, error = "failed", f"{type(exc).__name__}: {exc}"
                    raise
                finally:
                    if status != "complete":
                        self._stopped(status, error, lock)
        finally:
            shutdown()

    # -- the stages ---------------------------------------------------------------------------------

    def _stages(self, setup: RunSetup, start: int, lock: dict[str, Any]) -> RunResult:
        main, d = self.dist.is_main, self.dist
        history: dict[str, StageRecord] = {}
        torch.use_deterministic_algorithms(True, warn_only=True)
        state: ModelState | None = None
        scratch = tempfile.TemporaryDirectory(prefix="compresspipe-rank-") if not main else None
        current = "baseline"
        try:
            for index, (name, dirname) in enumerate(zip(self.names, self.dirnames, strict=True)):
                current = name
                final = self.folder.path / dirname
                stype = "baseline" if index == 0 else self.recipe.stages[index - 1].type
                metrics: dict[str, Any] = {}
                if index < start:
                    metrics = stage_folder.read_metrics(final) if main else {}
                    state = None  # loaded when the next stage needs it
                else:
                    partial = self.folder.path / f".{dirname}.partial"
                    if main:
                        _clear_partial(partial, keep_checkpoints=self.options.resume)
                        partial.mkdir(parents=True, exist_ok=True)
                    d.barrier()
                    # other ranks write their scratch files privately; epoch checkpoints are shared (rank 0 writes)
                    stage_dir = partial if scratch is None else Path(scratch.name) / partial.name
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    t0 = time.perf_counter()
                    if state is None and index > 0:  # resumed: continue from the last finished stage
                        state = load_model(self.folder.path / self.dirnames[index - 1])
                    seed_everything(self.recipe.seed + index)
                    ctx = StageContext(recipe=self.recipe, index=index, name=name, stage_dir=stage_dir,
                                       device=setup.device, seed=self.recipe.seed + index, data=setup.data,
                                       ui=self.ui, history=dict(history), reference=self.reference,
                                       checkpoint_root=partial / CHECKPOINTS,
                                       input_metrics=self.rows[-1] if self.rows else {})
                    result = self._run_stage(index, setup, state, ctx)
                    state = result.state
                    state.module.eval()
                    if main:
                        metrics = self._persist(index, stype, result, setup, partial, time.perf_counter() - t0, ctx)
                    d.barrier()
                history[name] = StageRecord(index, name, stype, final, metrics)
                if main:
                    self.rows.append(metrics)
                    self.folder.write_state("running", lock, completed=index + 1, world_size=d.world)
                    if self.options.after_stage is not None:
                        self.options.after_stage(name, list(self.rows))
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) or interrupted():  # an error raised while Ctrl-C unwinds
                raise KeyboardInterrupt from exc
            log = self.folder.path / ("error.log" if main else f"error.rank{d.rank}.log")
            if isinstance(exc, RunStopped):  # the caller stopped the run after a stage: no failure to log
                raise
            atomic_write_text(log, "".join(traceback.format_exception(exc)))
            if isinstance(exc, GateFailed):
                raise
            if isinstance(exc, CompressPipeError) and (exc.exit_code != 2 or current == "baseline"):
                raise
            # exit 2 promises that nothing ran (preflight checks every stage's plan first); once a stage has
            # written its folder, a failure is exit 3, and the finished stages are kept for --resume
            raise StageError(current, f"{exc if isinstance(exc, CompressPipeError) else f'{type(exc).__name__}: {exc}'}"
                                      f" (traceback in {log})") from exc
        finally:
            if scratch is not None:
                scratch.cleanup()
        return RunResult(self.folder.path, {})

    def _run_stage(self, index: int, setup: RunSetup, state: ModelState | None, ctx: StageContext) -> StageResult:
        heard: list[str] = []  # library warnings: the row's notes, not raw lines in the terminal
        if index == 0:
            heard += getattr(self, "early", [])
            self.ui.log("[bold]baseline[/]: building and evaluating the model")
            with library_messages(heard):
                baseline = setup.baseline()
            return StageResult(state=baseline, kind="weights", notes=heard)
        cfg = self.recipe.stages[index - 1]
        self.ui.log(f"[bold]stage {index}[/] {ctx.name} ({cfg.type})")
        if state is None:
            raise RuntimeError("a stage ran before the baseline was built")
        with library_messages(heard):
            result = setup.stages[index - 1].run(state, ctx)
        if not isinstance(result, StageResult):
            raise TypeError(f"stage returned {type(result).__name__}, expected StageResult")
        result.notes = [strip_ansi(n) for n in result.notes] + [n for n in heard if n not in result.notes]
        if self.dist.is_main:
            shutil.rmtree(ctx.checkpoints, ignore_errors=True)
        return result

    def _persist(self, index: int, stype: str, result: StageResult, setup: RunSetup, partial: Path,
                 seconds: float, ctx: StageContext) -> dict[str, Any]:
        """Save the stage's model, measure it in PyTorch and as the file that ships, and finish its folder."""
        files = save_model(result.state, partial)
        val = setup.data.loader("val", self.recipe.data.eval_batch_size)
        with self.ui.progress(f"evaluating {self.dirnames[index]}", len(val)) as bar:
            measured = measure_model(result.state.module, result.state.spec, files, val, setup.device,
                                     self.recipe.evaluate.latency, setup.data.num_classes, named_metrics(self.recipe),
                                     lambda: bar.advance(1))
        runtime = self.recipe.deploy_runtime()
        primary = primary_format(runtime, result.state, result.files)
        formats: dict[str, Any] = {}
        for fmt in dict.fromkeys([primary, *self._gate_formats(ctx.name)]):
            with self.ui.progress(f"measuring {self.dirnames[index]} as {fmt}", None):
                formats[fmt] = ship(fmt, result.state, ctx, partial, result.files, measured)
        metrics = {
            "version": 1, "index": index, "name": ctx.name, "type": stype, "kind": result.kind,
            "folder": self.dirnames[index], "input_shape": list(result.state.input_shape),
            "inputs": [i.model_dump(mode="json") for i in result.state.spec.inputs], **measured,
            "emulated": is_int8(result.state), "deploy": {"runtime": runtime, "format": primary},
            "formats": formats, "seconds": round(seconds, 3), "notes": result.notes, "details": result.details,
        }
        required = [f for entry in formats.values() for f in entry["files"]]
        stage_folder.finish(partial, self.folder.path / self.dirnames[index], metrics, required)
        return metrics

    def _gate_formats(self, name: str) -> list[str]:
        """Formats a gate or expect: block asks to judge on this stage, beyond the one that ships."""
        out: list[str] = [cfg.expect.format for cfg in self.recipe.stages
               if str(cfg.name) == name and cfg.expect is not None and cfg.expect.format]
        gates, names = self.recipe.gates, self.recipe.stage_names()
        if gates is not None and gates.format and names and name == (gates.stage or names[-1]):
            out.append(gates.format)
        return out

    # -- the report ---------------------------------------------------------------------------------

    def _extra(self, setup: RunSetup) -> dict[str, Any]:
        return {"device": str(setup.device), "run_folder": str(self.folder.path), "world_size": self.dist.world,
                "deploy": deploy_summary(self.recipe), "num_classes": setup.data.num_classes,
                "warnings": self._warnings(setup)}

    def _warnings(self, setup: RunSetup) -> list[str]:
        """What makes the whole report doubtful, said loudly in the terminal and the report."""
        out = []
        ref = next((r for r in self.rows if r.get("name") == self.reference), None)
        classes = setup.data.num_classes
        if ref is not None and classes and isinstance(ref.get("accuracy"), float):
            chance = 1 / classes
            if ref["accuracy"] < CHANCE_FACTOR * chance:
                out.append(f"the reference '{self.reference}' is at {100 * ref['accuracy']:.1f}% accuracy, near chance "
                           f"({100 * chance:.1f}% for {classes} classes): every ratio compares with a model that has "
                           "not learned; train it longer (or give a checkpoint), and require it with "
                           "gates.min_reference_accuracy")
        return out

    def _finish(self, setup: RunSetup, lock: dict[str, Any]) -> RunResult:
        timer = DeployTimer(self.recipe, self.folder.path, self.rows, self.reference)
        with self.ui.progress(f"timing every file in {self.recipe.deploy_runtime()}, interleaved rounds",
                              self.recipe.deploy.rounds) as bar:
            timer.measure(bar=bar)
        extra = self._extra(setup)
        for warning in extra["warnings"]:
            self.ui.log(f"[bold yellow]warning:[/] {warning}")
        report = build_report(self.recipe.name, self.rows, self.reference, "complete", extra)
        gates = evaluate_gates(self.recipe, report)
        noisy = [g for g in gates if g.get("within_noise")]
        if noisy:  # a speed limit inside the noise band: time those files again, longer, then judge
            with self.ui.progress("re-timing the files whose speed gate is within noise",
                                  2 * self.recipe.deploy.rounds) as bar:
                timer.remeasure([(g["stage"], g.get("format"), g["batch"]) for g in noisy], bar)
            report = build_report(self.recipe.name, self.rows, self.reference, "complete", extra)
            gates = evaluate_gates(self.recipe, report, remeasured=True)
        report["gates"] = gates
        report["gates_passed"] = all(g["passed"] for g in gates)
        rec = report.get("recommendation")
        if rec:
            self.ui.log(f"[bold]ship:[/] {', '.join(rec['files']) or 'nothing'}: {rec['reason']}")
        self._write_reports(report)
        if self.options.junit is not None:
            write_junit(self.options.junit, self.recipe.name, gates)
        self.folder.write_state("complete", lock, completed=len(self.rows))
        if not report["gates_passed"]:
            raise GateFailed(describe_failures(gates) + f"\nevery artifact was written to {self.folder.path}", report)
        return RunResult(self.folder.path, report)

    def _write_reports(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.folder.path / "report.json", report)
        atomic_write_text(self.folder.path / "report.md", render_markdown(report))
        atomic_write_text(self.folder.path / "report.html", render_html(report))

    def _stopped(self, status: str, error: str, lock: dict[str, Any]) -> None:
        """A failed or interrupted run still leaves run.json and report.json saying so, with the finished stages."""
        try:
            self.folder.write_state(status, lock, completed=len(self.rows),
                                    failed_stage=self.names[min(len(self.rows), len(self.names) - 1)])
            if self.rows:
                report = build_report(self.recipe.name, self.rows, self.reference, status,
                                      {"run_folder": str(self.folder.path), "error": error})
            else:
                report = {"format": "compresspipe.report", "version": 2, "recipe": self.recipe.name,
                          "status": status, "reference": None, "stages": [], "error": error}
            report["error"] = error
            self._write_reports(report)
        except (OSError, CompressPipeError, ValueError, TypeError, KeyError):
            pass  # the original error is what the user must see; a full disk must not hide it


def _clear_partial(partial: Path, keep_checkpoints: bool) -> None:
    """Remove what an interrupted attempt left, except its epoch checkpoints when resuming."""
    if not partial.exists():
        return
    for child in partial.iterdir():
        if keep_checkpoints and child.name == CHECKPOINTS:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def run_recipe(recipe: Recipe, recipe_path: Path | None, options: RunOptions, ui: UI) -> RunResult:
    return Executor(recipe, recipe_path, options, ui).run()
