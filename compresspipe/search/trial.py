"""One trial: the sampled values -> a plain recipe -> an ordinary run folder -> the objective values.

A trial's run folder is `trials/NNNN/` beside its recipe `trials/NNNN.yaml`, so `compresspipe run ... --resume`,
report.html and `verify` work on it like on any run. Before it runs, it takes the finished stages of an earlier
trial whose resolved recipe is the same up to there (every trial of a search that starts with `train` shares that
stage); resume then refuses anything whose recipe or inputs differ, and the trial starts over instead.

What the trial's attributes hold (so the outputs can be written from the storage alone): `figures` of the judged
stage's shipped file and `gates` (also the trial's Optuna constraints, <= 0 where passed), `folder`, `host`,
`error` for a failed trial, `stopped` for one stopped early, `interrupted` for one a Ctrl-C or kill ended.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresspipe.artifacts.files import atomic_write_text, read_json
from compresspipe.errors import CompressPipeError, GateFailed, RecipeError, RunFolderError, RunStopped
from compresspipe.recipe.search import apply_params, figure_values
from compresspipe.recipe.yamlio import dump_yaml

if TYPE_CHECKING:
    import optuna

    from compresspipe.recipe.search import SearchSpec
    from compresspipe.recipe.spec import Recipe

TRIALS = "trials"


@dataclass
class SearchSetup:
    """A search ready to run trials: its validated recipe, the data they vary, where they go."""

    recipe: Recipe  # the search recipe (with its search block), validated
    raw: dict[str, Any]  # its data before ${vars.x} substitution, paths absolute
    folder: Path  # the search folder on this machine
    base_dir: Path  # the folder of the recipe file (relative paths in the recipe were relative to it)

    @property
    def spec(self) -> SearchSpec:
        if self.recipe.search is None:
            raise ValueError("a search recipe has a search block")
        return self.recipe.search

    def trial_dir(self, number: int) -> Path:
        return self.folder / TRIALS / f"{number:04d}"

    def judged(self) -> str:
        """The stage whose shipped file the objectives measure: gates.stage, else the last stage."""
        gates = self.recipe.gates
        return (gates.stage if gates is not None and gates.stage else None) or self.recipe.stage_names()[-1]

    def gate_keys(self) -> list[str]:
        """The recipe's gates as the report names them (scope.gate): the trials' constraints."""
        from compresspipe.report.gates import gate_name

        keys = [f"stages.{s.name}.expect.{gate_name(s.expect, c, self.recipe)}" for s in self.recipe.stages
                if s.expect is not None for c in s.expect.checks()]
        if self.recipe.gates is not None:
            keys += [f"gates.{gate_name(self.recipe.gates, c, self.recipe)}" for c in self.recipe.gates.checks()]
        return keys

    def trial_data(self, params: dict[str, Any], number: int | None = None) -> dict[str, Any]:
        """The plain recipe of one trial (no search block); named after the trial, or `<name>-best`."""
        data = apply_params(self.raw, params)
        data["name"] = f"{self.recipe.name}-{'best' if number is None else f't{number:04d}'}"
        return data


def suggest(trial: optuna.Trial, spec: SearchSpec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if dim.choices is not None:
            params[key] = trial.suggest_categorical(key, dim.choices)
        elif dim.integer:
            params[key] = trial.suggest_int(key, int(dim.low or 0), int(dim.high or 0), step=int(dim.step or 1),
                                            log=dim.log)
        else:
            params[key] = trial.suggest_float(key, float(dim.low or 0), float(dim.high or 0), step=dim.step,
                                              log=dim.log)
    return params


def prefix_key(recipe: dict[str, Any], count: int) -> str:
    """What the first `count` stages of a run depend on: everything but the other stages, the name and the gates
    (a gate that measures an extra file of one of these stages counts)."""
    data = {k: v for k, v in recipe.items() if k not in ("name", "stages", "gates", "search")}
    stages = recipe.get("stages") or []
    data["stages"] = stages[:count]
    gates = recipe.get("gates") or {}
    names = [s.get("name") for s in stages[:count]]
    target = gates.get("stage") or (stages[-1].get("name") if stages else None)
    if gates.get("format") and target in names:
        data["gate_format"] = [target, gates.get("format")]
    return json.dumps(data, sort_keys=True, default=str)


def find_donor(setup: SearchSetup, recipe: dict[str, Any], dirnames: list[str], exclude: Path) -> tuple[Path, int]:
    """The earlier trial folder sharing the most leading finished stages with this recipe (None, 0 if none)."""
    best: tuple[Path | None, int] = (None, 0)
    root = setup.folder / TRIALS
    if not root.is_dir():
        return Path(), 0
    keys = [prefix_key(recipe, n) for n in range(len(dirnames))]
    for run_json in root.glob("*/run.json"):
        folder = run_json.parent
        if folder == exclude:
            continue
        try:
            state = read_json(run_json)
            other = state["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        n = 0
        # dirnames[0] is the baseline; stage k's folder is dirnames[k] and needs the first k stages to agree
        while n < len(dirnames) and prefix_key(other, n) == keys[n] and (folder / dirnames[n]).is_dir():
            n += 1
        if n > best[1]:
            best = (folder, n)
    return (best[0] or Path()), best[1]


class SurplusTrial(CompressPipeError):
    """A trial asked for after the study already had n_trials (workers racing); it runs nothing."""


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against n_trials: an interrupted one does not (its retry does), nor a surplus one."""
    from optuna.trial import TrialState

    return not (trial.state == TrialState.FAIL
                and (trial.user_attrs.get("interrupted") or trial.user_attrs.get("surplus")))


def surplus(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial `number` is past the budget: n_trials counted trials were numbered before it.

    Trial numbers are handed out by the storage, one each, so of two workers that race for the last trial the
    later-numbered one is surplus, whatever the order they check in."""
    before = sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and counts(t))
    return before >= budget


class TrialRunner:
    """Optuna's objective: run one trial and hand back its objective values."""

    def __init__(self, setup: SearchSetup, quiet: bool = True):
        self.setup = setup
        self.quiet = quiet
        self.host = socket.gethostname()
        self.last: int | None = None  # the number of the trial this runner last started

    def __call__(self, trial: optuna.Trial) -> list[float]:
        import optuna

        setup, spec = self.setup, self.setup.spec
        t0 = time.perf_counter()
        number = trial.number
        if surplus(trial.study, number, spec.trials()):
            # two workers saw n_trials - 1 counted and both asked for a trial: the one numbered later runs nothing
            trial.set_user_attr("surplus", True)
            self.last = None
            raise SurplusTrial(f"trial {number}: the study already has its {spec.trials()} trial(s)")
        params = suggest(trial, spec)
        self.last = number
        folder = setup.trial_dir(number)
        # a retried trial (Optuna's RetryFailedTrialCallback) arrives with the attributes of the one it retries
        previous = trial.user_attrs.get("folder") if trial.user_attrs.get("host") == self.host else None
        retry_of = setup.folder / previous if isinstance(previous, str) and previous != self._rel(folder) else None
        for key in ("figures", "gates", "gates_passed", "error", "stopped", "reused", "early_figures"):
            if key in trial.user_attrs:
                trial.set_user_attr(key, None)
        trial.set_user_attr("interrupted", False)
        trial.set_user_attr("host", self.host)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("threads", _threads())
        trial.set_user_attr("folder", self._rel(folder))
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of.name)
        try:
            report = self._run(trial, params, number, folder, retry_of)
        except RunStopped as exc:
            for key in setup.gate_keys():  # a trial stopped early counts as missing every gate
                trial.set_constraint(key, 1.0)
            trial.set_user_attr("stopped", str(exc))
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except CompressPipeError as exc:
            trial.set_user_attr("error", str(exc)[:2000])
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
            raise
        row = next(s for s in report["stages"] if s["name"] == setup.judged())
        figures = figure_values(row)
        gates = [{k: g.get(k) for k in ("scope", "gate", "value", "limit", "passed")} for g in report.get("gates") or []]
        trial.set_user_attr("figures", figures)
        trial.set_user_attr("gates", gates)
        trial.set_user_attr("gates_passed", all(g["passed"] for g in gates))
        for g in gates:
            trial.set_constraint(f"{g['scope']}.{g['gate']}", _violation(g))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        values = []
        for name in spec.objectives:
            value = figures.get(name)
            if value is None:
                raise CompressPipeError(f"trial {number}: the report has no {name} for stage {setup.judged()!r}")
            values.append(float(value))
        return values

    def _rel(self, folder: Path) -> str:
        return folder.relative_to(self.setup.folder).as_posix()

    def _run(self, trial: optuna.Trial, params: dict[str, Any], number: int, folder: Path,
             retry_of: Path | None) -> dict[str, Any]:
        from compresspipe.recipe.loader import validate_recipe_data
        from compresspipe.run.executor import RunOptions, run_recipe
        from compresspipe.run.folder import RunFolder, stage_dirname
        from compresspipe.run.setup import prepare
        from compresspipe.ui import UI

        setup = self.setup
        data = setup.trial_data(params, number)
        if retry_of is not None:  # the run folder it continues says the recipe's name: keep it, or resume refuses
            try:
                data["name"] = str(read_json(retry_of / "run.json")["recipe"]["name"])
            except (OSError, ValueError, KeyError, TypeError):
                retry_of = None
        path = folder.with_suffix(".yaml")
        header = f"# trial {number} of search {setup.recipe.name}: {json.dumps(params, default=str)}\n"
        atomic_write_text(path, header + dump_yaml(data))
        try:
            recipe = validate_recipe_data(data, None, base_dir=setup.base_dir)
        except RecipeError as exc:
            raise RecipeError(exc.problems) from None
        dirnames = [stage_dirname(i, n) for i, n in enumerate(["baseline", *recipe.stage_names()])]
        resume = False
        if retry_of is not None and (retry_of / "run.json").is_file() and not folder.exists():
            os.replace(retry_of, folder)  # the retried trial continues in its folder, under its new number
            resume = True
        elif setup.spec.reuse and not folder.exists():
            donor, count = find_donor(setup, recipe.to_data(), dirnames, folder)
            if count:
                setup_inputs = prepare(recipe).inputs
                run = RunFolder(folder)
                with run:
                    taken = run.seed_from(donor, dirnames[:count], recipe.to_data(), setup_inputs)
                resume = taken > 0
                trial.set_user_attr("reused", {"from": donor.name, "stages": taken})
        stream = io.StringIO()
        options = RunOptions(out=folder, resume=resume, force=not resume, after_stage=self._early_stop(trial))
        try:
            return run_recipe(recipe, path, options, UI(quiet=self.quiet, stream=stream)).report
        except GateFailed as exc:
            return exc.report or {"stages": [], "gates": []}
        except RunFolderError:
            if not resume:
                raise
            options.resume, options.force = False, True  # what it was seeded from differs: start over
            try:
                return run_recipe(recipe, path, options, UI(quiet=self.quiet, stream=stream)).report
            except GateFailed as exc:
                return exc.report or {"stages": [], "gates": []}

    def _early_stop(self, trial: optuna.Trial) -> Any:
        spec = self.setup.spec.early_stop
        if spec is None:
            return None
        from compresspipe.recipe.spec import Limits
        from compresspipe.report.build import build_report
        from compresspipe.report.gates import judge
        from compresspipe.run.setup import reference_name

        recipe = self.setup.recipe
        limits = Limits(**spec.limits())

        def hook(name: str, rows: list[dict[str, Any]]) -> None:
            if name != spec.after:
                return
            report = build_report(recipe.name, rows, reference_name(recipe), "running")
            row = report["stages"][-1]
            trial.set_user_attr("early_figures", figure_values(row))
            results = judge(limits, row, recipe.deploy_batch_sizes()[0], f"search.early_stop (after {name})")
            missed = [r for r in results if not r["passed"]]
            if missed:
                raise RunStopped(f"stopped early after {name}: " + "; ".join(
                    f"{r['gate']} {_number(r['value'])}, limit {_number(r['limit'])}" for r in missed))

        return hook


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _violation(gate: dict[str, Any]) -> float:
    """A gate as an Optuna constraint: <= 0 where it passes, the distance to its limit where it does not."""
    value, limit = gate.get("value"), gate.get("limit")
    if value is None or limit is None:
        return 1.0
    if gate.get("passed"):
        return 0.0
    return abs(float(value) - float(limit)) or 1e-9
