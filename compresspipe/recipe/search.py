"""The `search:` block of a recipe (no torch, no Optuna): what `compresspipe search` varies and what it optimizes.

A trial is the recipe with the searched values set and without its search block: a plain recipe. A key of the
space is a key path as `--set` writes it: `vars.NAME` sets a variable before `${vars.NAME}` is substituted, any
other path sets that value (a stage by index or by name: `stages.1.amount`, `stages.prune.amount`).

Objectives and `pick` name figures of the report row the gates judge (the last stage, or `gates.stage`), measured on
the file that ships: `figure_values` computes them from report.json, so a search can be re-picked from its stored
trials without running any.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from compresspipe.recipe.base import NAME_PATTERN, StrictModel

Direction = Literal["minimize", "maximize"]
Sampler = Literal["tpe", "nsga2", "grid", "random"]
Loc = tuple[str | int, ...]
DEFAULT_TRIALS = 20

# figure -> (what it is, the direction that is better); latency_bN and speedup_bN exist per deploy batch size
FIGURES: dict[str, tuple[str, Direction]] = {
    "accuracy": ("top-1 accuracy of the shipped file on the validation split (0..1)", "maximize"),
    "accuracy_drop": ("reference accuracy - accuracy (0.01 = one point)", "minimize"),
    "loss": ("cross-entropy of the shipped file on the validation split", "minimize"),
    "bytes": ("bytes of the shipped file", "minimize"),
    "params": ("parameters of the model", "minimize"),
    "macs": ("multiply-accumulates per sample", "minimize"),
    "sparsity": ("fraction of zero parameters", "maximize"),
    "size_reduction": ("reference bytes / bytes", "maximize"),
    "param_reduction": ("reference parameters / parameters", "maximize"),
    "mac_reduction": ("reference MACs / MACs", "maximize"),
}
PER_BATCH: dict[str, tuple[str, Direction]] = {
    "latency_b": ("latency in the deploy runtime at batch size N (ms, median of interleaved rounds)", "minimize"),
    "speedup_b": ("reference latency / latency at batch size N", "maximize"),
}
_PLACEHOLDER = re.compile(r"\$\{vars\.([A-Za-z_][A-Za-z0-9_-]*)\}")
_FORBIDDEN_ROOTS = ("compresspipe", "name", "search", "extends")


def figure_names(batch_sizes: list[int]) -> list[str]:
    """Every figure an objective, a pick or a constraint may name, for these deploy batch sizes."""
    return [*FIGURES, *[f"{p}{bs}" for p in PER_BATCH for bs in batch_sizes]]


def better_direction(figure: str) -> Direction:
    if figure in FIGURES:
        return FIGURES[figure][1]
    return next(d for p, (_, d) in PER_BATCH.items() if figure.startswith(p))


def figure_values(row: dict[str, Any]) -> dict[str, float | None]:
    """The figures of one report.json (version 2) row: its shipped file, against the reference."""
    vs = row.get("vs_reference") or {}
    delta = vs.get("accuracy_delta")
    out: dict[str, float | None] = {
        "accuracy": row.get("accuracy"), "accuracy_drop": None if delta is None else -delta,
        "loss": row.get("loss"), "bytes": row.get("bytes"), "params": row.get("params"), "macs": row.get("macs"),
        "sparsity": row.get("sparsity"), "size_reduction": vs.get("size_reduction"),
        "param_reduction": vs.get("param_reduction"), "mac_reduction": vs.get("mac_reduction"),
    }
    for bs, ms in (row.get("latency_ms") or {}).items():
        out[f"latency_b{bs}"] = ms
    for bs, ratio in (vs.get("speedup") or {}).items():
        out[f"speedup_b{bs}"] = ratio
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


class Dimension(StrictModel):
    """One searched value: `choices`, or a range `low`..`high` (integers when both ends and the step are integers),
    optionally on a log scale or in steps."""

    choices: list[Any] | None = Field(None, description="the values to choose from (numbers, strings, booleans)")
    low: int | float | None = Field(None, description="smallest value of a range")
    high: int | float | None = Field(None, description="largest value of a range")
    step: int | float | None = Field(None, gt=0, description="range in steps of this size from low")
    log: bool = Field(False, description="sample the range on a log scale (low > 0)")

    @model_validator(mode="after")
    def _shape(self) -> Dimension:
        ranged = [k for k in ("low", "high", "step") if getattr(self, k) is not None] + (["log"] if self.log else [])
        if self.choices is not None:
            if ranged:
                raise ValueError(f"give choices or a range (low, high), not both (got choices and {', '.join(ranged)})")
            if not self.choices:
                raise ValueError("empty choices: give at least one value")
            for i, c in enumerate(self.choices):
                if _kind(c) not in ("null", "boolean", "number", "string"):
                    raise ValueError(f"choices[{i}] must be a number, string, boolean or null (got a {_kind(c)})")
            kinds = sorted({_kind(c) for c in self.choices} - {"null"})
            if len(kinds) > 1:
                raise ValueError(f"choices must all be of one type (got {' and '.join(kinds)}: {self.choices})")
            seen: list[Any] = []
            for c in self.choices:
                if any(c == s and _kind(c) == _kind(s) for s in seen):
                    raise ValueError(f"choice {c!r} is given twice")
                seen.append(c)
            return self
        if self.low is None or self.high is None:
            raise ValueError("give choices: [...] or a range low: ..., high: ...")
        if isinstance(self.low, bool) or isinstance(self.high, bool):
            raise ValueError("a range needs numbers (got a boolean); use choices: [true, false]")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("a range needs finite low and high")
        if self.low > self.high:
            raise ValueError(f"empty range: low {self.low} is above high {self.high}")
        if self.low == self.high:
            raise ValueError(f"empty range: low and high are both {self.low}; a single value is choices: [{self.low}]")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        if self.step is not None and self.step > self.high - self.low:
            raise ValueError(f"step {self.step} is larger than the range {self.low}..{self.high}")
        return self

    @property
    def integer(self) -> bool:
        """A range of integers (Optuna's suggest_int)."""
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high)) and \
            (self.step is None or isinstance(self.step, int))

    def grid(self) -> list[Any] | None:
        """Every value of the dimension, or None where it is continuous (a float range without a step)."""
        if self.choices is not None:
            return list(self.choices)
        low, high = self.low, self.high
        if low is None or high is None:
            return None
        if self.integer:
            return list(range(int(low), int(high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        n = int(math.floor((high - low) / self.step + 1e-9))
        return [round(low + i * self.step, 12) for i in range(n + 1)]

    def representatives(self) -> list[tuple[Loc, Any]]:
        """(where in the dimension, value) pairs that stand for the whole dimension in validation: every choice,
        both ends of a range."""
        if self.choices is not None:
            return [(("choices", i), c) for i, c in enumerate(self.choices)]
        return [(("low",), self.low), (("high",), self.high)]

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        extra = " (log)" if self.log else f" step {self.step}" if self.step is not None else ""
        return f"{'integer' if self.integer else 'float'} {self.low}..{self.high}{extra}"


class EarlyStop(StrictModel):
    """Stop a trial after an intermediate stage when its result is already hopeless (Optuna records it as pruned).

    The limits judge that stage's shipped file against the reference, like gates; latency is not measured until
    the end of a run, so there is no speed limit here."""

    after: str = Field(description="name of the stage after which the trial is judged")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_size_reduction: float | None = Field(None, gt=0)
    min_param_reduction: float | None = Field(None, gt=0)
    min_mac_reduction: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> EarlyStop:
        if not self.limits():
            raise ValueError("give at least one limit, e.g. early_stop: {after: prune, max_accuracy_drop: 0.05}")
        return self

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self if k != "after" and v is not None}


class SearchSpec(StrictModel):
    """A search over recipe values with Optuna: every trial is the recipe with sampled values, run into an
    ordinary run folder; constraints are the recipe's gates."""

    space: dict[str, Dimension] = Field(
        min_length=1, description="key path (as --set writes it: vars.width, stages.prune.amount) -> "
                                  "{choices: [...]} or {low, high, step, log}")
    objectives: dict[str, Direction] = Field(
        min_length=1, description="report figure of the judged stage's shipped file -> minimize | maximize, e.g. "
                                  "{accuracy_drop: minimize, bytes: minimize, latency_b1: minimize}")
    sampler: Sampler = Field("tpe", description="tpe | nsga2 | grid (choices and stepped ranges) | random")
    n_trials: PositiveInt | None = Field(
        None, description=f"trials in the whole study, all workers together; default {DEFAULT_TRIALS}, for grid the "
                          "size of the grid")
    timeout: float | None = Field(None, gt=0, description="each worker starts no trial after this many seconds")
    seed: int | None = Field(None, ge=0, description="sampler seed; default: the recipe's seed")
    storage: str | None = Field(
        None, description="where the study lives: an SQLAlchemy URL (sqlite:///file.db, postgresql://user@host/db) "
                          "or the path of an Optuna journal file; default: study.db in the search folder")
    study: str | None = Field(None, pattern=NAME_PATTERN, description="study name; default: the recipe's name")
    early_stop: EarlyStop | None = Field(None, description="stop hopeless trials after an intermediate stage")
    pick: dict[str, Any] | None = Field(
        None, description="which finished trial best.yaml is: {minimize: latency_b1, max_accuracy_drop: 0.005}; "
                          "default: the first objective among the trials that pass the gates")
    reuse: bool = Field(True, description="start a trial from the finished stages of an earlier trial whose recipe "
                                          "is the same up to there (e.g. the shared train stage)")

    def trials(self) -> int:
        if self.n_trials is not None:
            return self.n_trials
        if self.sampler == "grid":
            return math.prod(len(d.grid() or [0]) for d in self.space.values())
        return DEFAULT_TRIALS


# -- picking a trial ------------------------------------------------------------------------------------------------


def parse_pick(text: str) -> dict[str, Any]:
    """`minimize=latency_b1,max_accuracy_drop=0.005` -> {"minimize": "latency_b1", "max_accuracy_drop": 0.005}."""
    from compresspipe.recipe.yamlio import resolve_plain_scalar

    out: dict[str, Any] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part.strip()!r} is not KEY=VALUE (e.g. minimize=latency_b1,max_accuracy_drop=0.005)")
        out[key.strip()] = resolve_plain_scalar(value.strip())
    return out


def pick_problems(pick: dict[str, Any], names: list[str]) -> list[tuple[Loc, str]]:
    """What is wrong with a pick: exactly one of minimize/maximize naming a figure; every other key is max_FIGURE
    or min_FIGURE with a number (min_speedup is the speedup at the first deploy batch size, as in gates)."""
    from compresspipe.registry import unknown_message

    problems: list[tuple[Loc, str]] = []
    goals = [k for k in pick if k in ("minimize", "maximize")]
    if len(goals) != 1:
        problems.append(((), "give exactly one of minimize: FIGURE or maximize: FIGURE"
                             + (f" (got {' and '.join(goals)})" if goals else "")))
    for key, value in pick.items():
        if key in ("minimize", "maximize"):
            if value not in names:
                problems.append(((key,), unknown_message("figure", value, names)))
            continue
        figure = limit_figure(key, names)
        if figure is None:
            allowed = [f"{b}_{n}" for n in names for b in ("max", "min")]
            problems.append(((key,), unknown_message("pick key", key, ["minimize", "maximize", *allowed])))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(((key,), f"must be a number (got {value!r})"))
    return problems


def limit_figure(key: str, names: list[str]) -> str | None:
    """The figure a `max_X` / `min_X` limit bounds (min_speedup: at the first deploy batch size), or None."""
    for prefix in ("max_", "min_"):
        if key.startswith(prefix):
            figure = key[len(prefix):]
            if figure == "speedup":
                figure = next((n for n in names if n.startswith("speedup_b")), figure)
            return figure if figure in names else None
    return None


# -- trials: the recipe with the searched values set ----------------------------------------------------------------


def stage_index(stages: Any, part: str | int) -> int | None:
    """A stage given by index or by name (the names the loader gives: explicit, else type, type-2, ...)."""
    from compresspipe.recipe.compose import raw_stage_names

    if not isinstance(stages, list):
        return None
    if isinstance(part, int) or str(part).isdigit():
        i = int(part)
        return i if 0 <= i < len(stages) else None
    names = raw_stage_names(stages)
    return names.index(str(part)) if str(part) in names else None


def key_path(raw: dict[str, Any], key: str) -> tuple[Loc | None, str | None]:
    """The location a space key sets in the recipe data (stage names resolved to indexes), or why it cannot."""
    from compresspipe.recipe.compose import raw_stage_names
    from compresspipe.registry import unknown_message

    parts: list[str | int] = [p for p in key.split(".")]
    if any(p == "" for p in parts):
        return None, f"empty part in key path {key!r}"
    if parts[0] in _FORBIDDEN_ROOTS:
        return None, f"{parts[0]!r} cannot be searched"
    if parts[0] == "vars":
        if len(parts) != 2:
            return None, "a variable is vars.NAME"
        return ("vars", str(parts[1])), None
    if parts[0] == "stages":
        if len(parts) < 3:
            return None, "name a stage and one of its keys: stages.NAME.KEY (or stages.INDEX.KEY)"
        stages = raw.get("stages")
        index = stage_index(stages, parts[1])
        if index is None:
            names = [n for n in raw_stage_names(stages) if n] if isinstance(stages, list) else []
            return None, unknown_message("stage", parts[1], [*names, *map(str, range(len(names)))])
        parts[1] = index
    return tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in parts), None


def used_variables(data: Any) -> set[str]:
    """Names of the variables a recipe's data uses as ${vars.NAME} (outside its vars and search blocks)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            found.update(_PLACEHOLDER.findall(node))

    walk({k: v for k, v in data.items() if k not in ("vars", "search")} if isinstance(data, dict) else data)
    return found


def _get(data: Any, loc: Loc) -> tuple[bool, Any]:
    node: Any = data
    for part in loc:
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                return False, None
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _set(data: Any, loc: Loc, value: Any) -> None:
    node: Any = data
    for part in loc[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[loc[-1]] = value


def apply_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The plain recipe data of one trial: the searched values set, variables substituted, no search block."""
    from compresspipe.recipe.compose import substitute_vars
    from compresspipe.recipe.yamlio import YamlDocument

    data = copy.deepcopy(raw)
    data.pop("search", None)
    for key, value in params.items():
        loc, why = key_path(raw, key)
        if loc is None:
            raise ValueError(f"search.space.{key}: {why}")
        _set(data, loc, copy.deepcopy(value))
    return substitute_vars(data, YamlDocument(data, "<trial>", {}, {}))


def space_problems(raw: dict[str, Any], spec: SearchSpec, validate: Callable[[dict[str, Any]], list[str]],
                   ) -> list[tuple[Loc, str]]:
    """Each space key must name a value the recipe has or may have, and each of its values must give a valid recipe.

    `validate(data)` returns the problems of plain recipe data ("path: message"); locations are within
    `search.space`.
    """
    problems: list[tuple[Loc, str]] = []
    found_vars = raw.get("vars")
    variables: dict[str, Any] = found_vars if isinstance(found_vars, dict) else {}
    used = used_variables(raw)
    for key, dim in spec.space.items():
        loc, why = key_path(raw, key)
        if loc is None:
            problems.append(((key,), str(why)))
            continue
        if loc[0] == "vars":
            name = str(loc[1])
            if name not in variables:
                known = ", ".join(sorted(variables)) or "(none)"
                problems.append(((key,), f"variable {name!r} is not defined in vars (defined: {known})"))
                continue
            if name not in used:
                problems.append(((key,), f"variable {name!r} is never used in the recipe (no ${{vars.{name}}} "
                                         "outside vars): searching it would change nothing"))
                continue
        exists, current = _get(raw, loc)
        if exists and isinstance(current, str) and _PLACEHOLDER.fullmatch(current):
            exists = False  # the variable's type governs; validation below checks the values
        for where, value in dim.representatives():
            if exists and current is not None and _kind(value) not in ("null", _kind(current)):
                problems.append(((key, *where), f"{value!r} is a {_kind(value)}, but {key} is a {_kind(current)} "
                                                f"({current!r})"))
                break
            try:
                data = apply_params(raw, {key: value})
            except Exception as exc:  # a RecipeError from substitution, or a path that cannot be set
                problems.append(((key, *where), f"{value!r}: {exc}"))
                break
            found = validate(data)
            if found:
                problems.append(((key, *where), f"{value!r} does not give a valid recipe: {found[0]}"))
                break
    return problems


def search_problems(raw: dict[str, Any], spec: SearchSpec, stage_names: list[str], batch_sizes: list[int],
                    validate: Callable[[dict[str, Any]], list[str]], latency: bool = True) -> list[tuple[Loc, str]]:
    """Every problem of a search block that needs the whole recipe; locations are within `search`."""
    from compresspipe.registry import unknown_message

    names = figure_names(batch_sizes)
    problems: list[tuple[Loc, str]] = [(("space", *loc), m) for loc, m in space_problems(raw, spec, validate)]
    for figure in spec.objectives:
        if figure not in names:
            problems.append((("objectives", figure), unknown_message("objective", figure, names)
                             + " (figures of the judged stage's shipped file; latency_bN/speedup_bN for each deploy "
                               "batch size)"))
        elif figure.startswith(("latency_b", "speedup_b")) and not latency:
            problems.append((("objectives", figure), f"{figure} needs latency measurement (evaluate.latency.enabled: "
                                                     "true)"))
    if spec.sampler == "grid":
        for key, dim in spec.space.items():
            if dim.grid() is None:
                problems.append((("space", key), "sampler grid needs a finite set of values: give choices, or a "
                                                 "step for this float range"))
    if spec.early_stop is not None:
        after = spec.early_stop.after
        if after not in stage_names:
            problems.append((("early_stop", "after"), unknown_message("stage name", after, stage_names)))
        elif stage_names and after == stage_names[-1]:
            problems.append((("early_stop", "after"), f"{after!r} is the last stage: the trial is over by then; "
                                                      "name an intermediate stage"))
    if spec.pick is not None:
        problems += [(("pick", *loc), m) for loc, m in pick_problems(spec.pick, names)]
    return problems
