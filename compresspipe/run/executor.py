"""Run a validated recipe: baseline, then each stage in order, persisting a reloadable model after each.

Run folder (default runs/<name>/):
  run.json            state of the run (status, hashes, pid); what --resume reads
  recipe.lock.yaml    the resolved recipe, package versions, seed, device, input hashes
  00-baseline/ 01-<stage>/ ...   model.safetensors, model.json, metrics.json, manifest.json (+ stage files)
  report.json report.md
A stage's folder appears only when it is complete (written as .NN-name.partial, then renamed).
"""

from __future__ import annotations

import io
import os
import platform
import random
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from compresspipe.artifacts.files import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
    sha256_json,
)
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.data.sources import DataSplits, load_data
from compresspipe.deploy.ship import is_int8, primary_format, ship
from compresspipe.deploy.timer import DeployTimer
from compresspipe.errors import CompressPipeError, GateFailed, InputError, RunFolderError, StageError
from compresspipe.metrics import count_macs, count_nonzero, count_params, evaluate, measure_latency
from compresspipe.recipe.spec import Recipe, StageConfig
from compresspipe.recipe.yamlio import dump_yaml
from compresspipe.registry import import_ref
from compresspipe.report.build import build_report, deploy_summary, render_markdown, render_table
from compresspipe.report.gates import describe_failures, evaluate_gates, write_junit
from compresspipe.report.html import render_html
from compresspipe.stages.base import Stage, StageResult
from compresspipe.stages.context import CHECKPOINTS, StageContext, StageRecord
from compresspipe.training.distributed import Dist, init_from_env, shutdown
from compresspipe.ui import UI

RUN_FORMAT = "compresspipe.run"
RUN_VERSION = 1
METRICS_FORMAT = "compresspipe.metrics"
MANIFEST_FORMAT = "compresspipe.manifest"
PACKAGES = ("compresspipe", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "torchao",
            "executorch", "safetensors", "pydantic", "numpy", "scikit-learn")


@dataclass
class RunOptions:
    out: Path | None = None
    resume: bool = False
    force: bool = False
    junit: Path | None = None


@dataclass
class RunResult:
    folder: Path
    report: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for, but no CUDA device is available here; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_implementation(config: StageConfig) -> type[Stage]:
    try:
        impl = import_ref(config.implementation)
    except Exception as exc:
        raise InputError(f"stage {config.name!r} ({config.type}): cannot import its implementation "
                         f"{config.implementation!r}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(impl, type) and issubclass(impl, Stage)):
        raise InputError(f"stage type {config.type!r}: {config.implementation!r} is not a Stage subclass")
    return impl


def check_requirements(recipe: Recipe, impls: list[type[Stage]], data: DataSplits) -> None:
    """Each stage declares the data it needs; say which stage lacks it before anything runs."""
    sizes = {"train_data": ("training", len(data.train)),  # type: ignore[arg-type]
             "calibration_data": ("calibration", len(data.calibration))}  # type: ignore[arg-type]
    for cfg, impl in zip(recipe.stages, impls, strict=True):
        for need in sorted(impl.requires & set(sizes)):
            split, n = sizes[need]
            if n == 0:
                raise InputError(f"stage {cfg.name!r} ({cfg.type}) needs {split} data, but the {split} split of "
                                 f"dataset {recipe.data.dataset!r} is empty; give it more samples")


def _pid_alive(pid: int | None, host: str | None) -> bool:
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path or '(root)'}: {a!r} -> {b!r}"]


class Executor:
    def __init__(self, recipe: Recipe, recipe_path: Path | None, options: RunOptions, ui: UI):
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.options = options
        self.ui = ui
        self.folder = options.out or Path("runs") / recipe.name
        self.rows: list[dict[str, Any]] = []
        self.state_file = self.folder / "run.json"
        self.dist = Dist()

    # -- preparation ------------------------------------------------------------------------------

    def prepare(self) -> tuple[DataSplits, dict[str, Any], list[type[Stage]]]:
        """Everything that can fail on bad input, before any weight is touched or file written."""
        impls = [stage_implementation(cfg) for cfg in self.recipe.stages]
        seed_everything(self.recipe.seed)
        shape = tuple(self.recipe.model.input_shape) if self.recipe.model.input_shape else None
        data = load_data(self.recipe.data, self.recipe.seed, shape)
        if shape is not None and tuple(data.input_shape) != shape:
            raise InputError(f"model.input_shape is {list(shape)} but dataset {self.recipe.data.dataset!r} "
                             f"gives samples of shape {list(data.input_shape)}")
        check_requirements(self.recipe, impls, data)
        inputs: dict[str, Any] = {"data": data.fingerprint()}
        if self.recipe.model.checkpoint:
            inputs["checkpoint"] = sha256_file(Path(self.recipe.model.checkpoint))
        return data, inputs, impls

    def _lock(self, inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return {
            "format": "compresspipe.lock",
            "version": 1,
            "recipe_file": str(self.recipe_path) if self.recipe_path else None,
            "recipe_sha256": sha256_json(self.recipe.to_data()),
            "inputs": inputs,
            "seed": self.recipe.seed,
            "device": str(device),
            "packages": package_versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "recipe": self.recipe.to_data(),
        }

    def _open_folder(self, lock: dict[str, Any]) -> int:
        """Claim the run folder; return the index of the first stage to run (0 = baseline)."""
        folder, opts = self.folder, self.options
        if self.state_file.exists():
            try:
                state = read_json(self.state_file)
            except ValueError:
                state = {}
            alive = state.get("status") == "running" and _pid_alive(state.get("pid"), state.get("host"))
            if alive:
                raise RunFolderError(f"{folder}: a run is in progress there (pid {state.get('pid')}); "
                                     "wait for it or choose another folder with --out")
            if opts.resume and not opts.force:
                changes = _diff(state.get("recipe"), lock["recipe"])
                if state.get("inputs") != lock["inputs"]:
                    changes += [f"input {k} changed" for k in sorted(set(state.get("inputs", {})) | set(lock["inputs"]))
                                if state.get("inputs", {}).get(k) != lock["inputs"].get(k)]
                if changes:
                    shown = "\n  ".join(changes[:10])
                    raise RunFolderError(f"{folder}: cannot resume, the recipe or its inputs changed since the run "
                                         f"started:\n  {shown}\nuse --force to start over")
                return self._completed_prefix()
            if not opts.force:
                what = "a finished run" if state.get("status") == "complete" else "an unfinished run"
                hint = "" if state.get("status") == "complete" else "--resume to continue it, "
                raise RunFolderError(f"{folder}: holds {what}; use {hint}--force to overwrite it, "
                                     "or --out to choose another folder")
            shutil.rmtree(folder)
        elif folder.exists() and any(folder.iterdir()):
            raise RunFolderError(f"{folder}: exists, is not empty and is not a compresspipe run folder; "
                                 "choose another folder with --out")
        elif opts.resume:
            raise RunFolderError(f"{folder}: nothing to resume (no run.json); run without --resume")
        return 0

    def _stage_dirname(self, index: int) -> str:
        name = "baseline" if index == 0 else str(self.recipe.stages[index - 1].name)
        return f"{index:02d}-{name}"

    def _completed_prefix(self) -> int:
        """Number of leading stages (baseline included) whose folders are complete and intact."""
        n = 0
        for index in range(len(self.recipe.stages) + 1):
            folder = self.folder / self._stage_dirname(index)
            if not self._intact(folder):
                break
            n += 1
        return n

    @staticmethod
    def _intact(folder: Path) -> bool:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return False
        try:
            files = read_json(manifest)["files"]
            return all((folder / name).is_file() and sha256_file(folder / name) == info["sha256"]
                       for name, info in files.items())
        except (ValueError, KeyError, TypeError):
            return False

    def _write_state(self, status: str, lock: dict[str, Any], **extra: Any) -> None:
        atomic_write_json(self.state_file, {
            "format": RUN_FORMAT, "version": RUN_VERSION, "status": status, "pid": os.getpid(),
            "host": socket.gethostname(), "recipe": lock["recipe"], "inputs": lock["inputs"],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
        })

    # -- measurement ------------------------------------------------------------------------------

    def measure(self, state: ModelState, files: list[Path], data: DataSplits, device: torch.device) -> dict[str, Any]:
        model = state.module
        acc, loss = evaluate(model.to(device), data.loader("val", self.recipe.data.eval_batch_size), device)
        model.to("cpu")
        lat = self.recipe.evaluate.latency
        latency: dict[str, float] = {}
        if lat.enabled:
            measured = measure_latency(model, state.input_shape, lat.batch_sizes, lat.warmup, lat.iters, lat.threads)
            latency = {str(bs): ms for bs, ms in measured.items()}
        params = count_params(model)
        nonzero = count_nonzero(model)
        return {
            "accuracy": acc,
            "loss": loss,
            "params": params,
            "nonzero_params": nonzero,
            "sparsity": 0.0 if params == 0 else 1 - nonzero / params,
            "bytes": sum(p.stat().st_size for p in files),
            "macs": count_macs(model, state.input_shape),
            "latency_ms": latency,
        }

    def _persist(self, index: int, config_type: str, result: StageResult, data: DataSplits, device: torch.device,
                 partial: Path, seconds: float, ctx: StageContext) -> dict[str, Any]:
        files = save_model(result.state, partial)
        with self.ui.progress(f"evaluating {self._stage_dirname(index)}", None):
            measured = self.measure(result.state, files, data, device)
        runtime = self.recipe.deploy_runtime()
        primary = primary_format(runtime, result.state, result.files)
        formats: dict[str, Any] = {}
        for fmt in [primary, *(f for f in self._gate_formats(ctx.name) if f != primary)]:
            with self.ui.progress(f"measuring {self._stage_dirname(index)} as {fmt}", None):
                formats[fmt] = ship(fmt, result.state, ctx, partial, result.files, measured)
        metrics = {
            "format": METRICS_FORMAT, "version": 1, "index": index,
            "name": "baseline" if index == 0 else self.recipe.stages[index - 1].name,
            "type": config_type, "kind": result.kind, "folder": self._stage_dirname(index),
            "input_shape": list(result.state.input_shape),
            **measured,
            "emulated": is_int8(result.state),
            "deploy": {"runtime": runtime, "format": primary},
            "formats": formats,
            "seconds": round(seconds, 3), "notes": result.notes, "details": result.details,
        }
        atomic_write_json(partial / "metrics.json", metrics)
        manifest = {name.relative_to(partial).as_posix(): {"sha256": sha256_file(name), "bytes": name.stat().st_size}
                    for name in sorted(partial.rglob("*")) if name.is_file() and not name.name.startswith(".")}
        atomic_write_json(partial / "manifest.json", {"format": MANIFEST_FORMAT, "version": 1, "files": manifest})
        final = self.folder / self._stage_dirname(index)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        return metrics

    def _gate_formats(self, name: str) -> list[str]:
        """Formats a gate or expect: block asks to judge on this stage, beyond the one that ships."""
        out: list[str] = []
        for cfg in self.recipe.stages:
            if str(cfg.name) == name and cfg.expect is not None and cfg.expect.format:
                out.append(cfg.expect.format)
        gates = self.recipe.gates
        names = self.recipe.stage_names()
        if gates is not None and gates.format and names and name == (gates.stage or names[-1]):
            out.append(gates.format)
        return list(dict.fromkeys(out))

    # -- the run ----------------------------------------------------------------------------------

    def reference_name(self) -> str:
        """The uncompressed model ratios compare with: the last of the leading train stages, else baseline."""
        ref = "baseline"
        for cfg in self.recipe.stages:
            if cfg.type != "train":
                break
            ref = str(cfg.name)
        return ref

    def run(self) -> RunResult:
        device = resolve_device(self.recipe.device)
        self.dist = init_from_env(device)
        if not self.dist.is_main:  # only rank 0 prints and writes
            self.ui = UI(quiet=True, stream=io.StringIO())
        try:
            return self._run(device)
        finally:
            shutdown()

    def _run(self, device: torch.device) -> RunResult:
        from compresspipe.models.factory import build_from_spec

        main, d = self.dist.is_main, self.dist
        data, inputs, impls = self.prepare()
        lock = self._lock(inputs, device)
        if main:
            start = self._open_folder(lock)
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "recipe.lock.yaml", dump_yaml(lock))
            self._write_state("running", lock, world_size=d.world)
        start = d.broadcast(start if main else None)
        if start:
            self.ui.log(f"resuming {self.folder}: {start} finished stage(s) kept")
        history: dict[str, StageRecord] = {}
        reference = self.reference_name()
        torch.use_deterministic_algorithms(True, warn_only=True)
        state: ModelState | None = None
        current = "baseline"
        scratch = tempfile.TemporaryDirectory(prefix="compresspipe-rank-") if not main else None
        try:
            for index in range(len(self.recipe.stages) + 1):
                name = "baseline" if index == 0 else str(self.recipe.stages[index - 1].name)
                current = name
                stype = "baseline" if index == 0 else self.recipe.stages[index - 1].type
                final = self.folder / self._stage_dirname(index)
                metrics: dict[str, Any] = {}
                if index < start:
                    if main:
                        metrics = read_json(final / "metrics.json")
                    state = None  # loaded lazily when the next stage needs it
                else:
                    partial = self.folder / f".{self._stage_dirname(index)}.partial"
                    if main:
                        self._clear_partial(partial, keep_checkpoints=self.options.resume)
                        partial.mkdir(parents=True, exist_ok=True)
                    d.barrier()
                    # other ranks write their scratch files privately; epoch checkpoints are shared (rank 0 writes)
                    stage_dir = partial if scratch is None else Path(scratch.name) / partial.name
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    t0 = time.perf_counter()
                    if state is None and index > 0:  # resumed: continue from the last finished stage
                        state = load_model(self.folder / self._stage_dirname(index - 1))
                    seed_everything(self.recipe.seed + index)
                    ctx = StageContext(self.recipe, index, name, stage_dir, device, self.recipe.seed + index,
                                       data, self.ui, dict(history), reference, checkpoint_root=partial / CHECKPOINTS)
                    if index == 0:
                        self.ui.log("[bold]baseline[/]: building and evaluating the model")
                        module = build_from_spec(self.recipe.model)
                        source = self.recipe.model.model_dump(include={"builtin", "torchvision", "kwargs"})
                        state = ModelState(module.eval(), source, tuple(data.input_shape), data.num_classes)
                        result = StageResult(state=state, kind="weights")
                    else:
                        cfg = self.recipe.stages[index - 1]
                        self.ui.log(f"[bold]stage {index}[/] {name} ({cfg.type})")
                        result = self._run_stage(impls[index - 1](cfg), cast(ModelState, state), ctx)
                    state = result.state
                    state.module.eval()
                    if main:
                        metrics = self._persist(index, stype, result, data, device, partial,
                                                time.perf_counter() - t0, ctx)
                    d.barrier()
                history[name] = StageRecord(index, name, stype, final, metrics)
                if main:
                    self.rows.append(metrics)
                    self._write_state("running", lock, completed=index + 1, world_size=d.world)
        except KeyboardInterrupt:
            if main:
                self._write_state("interrupted", lock, completed=len(self.rows), failed_stage=current)
            raise
        except BaseException as exc:
            log = self.folder / ("error.log" if main else f"error.rank{d.rank}.log")
            atomic_write_text(log, "".join(traceback.format_exception(exc)))
            if main:
                self._write_state("failed", lock, completed=len(self.rows), failed_stage=current)
            if isinstance(exc, CompressPipeError):
                raise
            raise StageError(current, f"{type(exc).__name__}: {exc} (traceback in {log})") from exc
        finally:
            if scratch is not None:
                scratch.cleanup()
        if not main:
            return RunResult(self.folder, {})
        return self._finish(lock, device, reference)

    def _finish(self, lock: dict[str, Any], device: torch.device, reference: str) -> RunResult:
        timer = DeployTimer(self.recipe, self.folder, self.rows, reference)
        with self.ui.progress(f"timing every file in {self.recipe.deploy_runtime()}, interleaved", None):
            timer.measure()
        extra = {"device": str(device), "run_folder": str(self.folder), "world_size": self.dist.world,
                 "deploy": deploy_summary(self.recipe)}
        report = build_report(self.recipe.name, self.rows, reference, "complete", extra)
        gates = evaluate_gates(self.recipe, report)
        noisy = [g for g in gates if g.get("within_noise")]
        if noisy:  # a speed limit inside the noise band: measure those files again, longer, then judge
            with self.ui.progress("re-timing the files whose speed gate is within noise", None):
                timer.remeasure([(g["stage"], g.get("format"), g["batch"]) for g in noisy])
            report = build_report(self.recipe.name, self.rows, reference, "complete", extra)
            gates = evaluate_gates(self.recipe, report, remeasured=True)
        report["gates"] = gates
        report["gates_passed"] = all(g["passed"] for g in gates)
        atomic_write_json(self.folder / "report.json", report)
        atomic_write_text(self.folder / "report.md", render_markdown(report))
        atomic_write_text(self.folder / "report.html", render_html(report))
        if self.options.junit is not None:
            write_junit(self.options.junit, self.recipe.name, gates)
        self._write_state("complete", lock, completed=len(self.rows))
        self.ui.console.print(render_table(report))
        self.ui.console.print(f"run folder: {self.folder}")
        if not report["gates_passed"]:
            raise GateFailed(describe_failures(gates) + f"\nevery artifact was written to {self.folder}", report)
        return RunResult(self.folder, report)

    def _run_stage(self, stage: Stage, state: ModelState, ctx: StageContext) -> StageResult:
        result = stage.run(state, ctx)
        if not isinstance(result, StageResult):
            raise TypeError(f"stage returned {type(result).__name__}, expected StageResult")
        if self.dist.is_main:
            shutil.rmtree(ctx.checkpoints, ignore_errors=True)
        return result

    @staticmethod
    def _clear_partial(partial: Path, keep_checkpoints: bool) -> None:
        """Remove what an interrupted attempt left, except its epoch checkpoints when resuming."""
        if not partial.exists():
            return
        for child in partial.iterdir():
            if keep_checkpoints and child.name == CHECKPOINTS:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def run_recipe(recipe: Recipe, recipe_path: Path | None, options: RunOptions, ui: UI) -> RunResult:
    return Executor(recipe, recipe_path, options, ui).run()
