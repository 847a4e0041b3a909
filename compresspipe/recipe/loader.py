"""Recipe file -> validated Recipe, reporting every problem with file, line, column and key path."""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from compresspipe.errors import Problem, RecipeError
from compresspipe.recipe.compose import load_composed, substitute_vars
from compresspipe.recipe.overrides import Override, apply_overrides, join_dotted_keys, parse_overrides
from compresspipe.recipe.spec import (
    FORMAT_RUNTIME,
    RECIPE_VERSION,
    DataConfig,
    Recipe,
    StageConfig,
    runtime_missing,
)
from compresspipe.recipe.yamlio import Loc, YamlDocument, format_loc
from compresspipe.registry import closest, unknown_message


class _Reporter:
    """Collects problems and knows where each key path came from (file position or a --set)."""

    def __init__(self, doc: YamlDocument, overrides: Sequence[Override]):
        self.doc = doc
        self.overrides = overrides
        self.problems: list[Problem] = []

    def add(self, loc: Loc, message: str, key: bool = False) -> None:
        for ov in reversed(self.overrides):
            if tuple(loc[: len(ov.loc)]) == ov.loc:
                self.problems.append(Problem(f"--set {ov.raw}", None, None, format_loc(loc), message))
                return
        pos = self.doc.where(loc, key=key)
        line, col = pos if pos else (None, None)
        self.problems.append(Problem(self.doc.file_of(loc), line, col, format_loc(loc), message))

    def add_validation_error(self, exc: ValidationError, prefix: Loc, model: type[BaseModel]) -> None:
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            # pydantic inserts function names for Annotated validators; keep only real keys and indexes
            loc = tuple(p for p in loc if isinstance(p, int) or not str(p).startswith("function-"))
            full = (*prefix, *loc)
            self.add(full, _message(err, model, loc), key=err["type"] == "extra_forbidden")


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str] | None:
    """The allowed keys of the mapping at loc within model, for 'allowed: ...' hints."""
    current: Any = model
    for part in loc:
        current = _strip(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            if not args:
                return None
            current = args[0]
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
    current = _strip(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _strip(tp: Any) -> Any:
    """Optional[X] / Annotated[X, ...] / SerializeAsAny[X] -> X."""
    for _ in range(5):
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            tp = args[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        elif origin is list or hasattr(tp, "__origin__") and getattr(tp, "__args__", None) and origin is None:
            return tp
        else:
            return tp
    return tp


def _message(err: Any, model: type[BaseModel], loc: Loc) -> str:
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1]) or []
        key = str(loc[-1]) if loc else "?"
        msg = f"unknown key {key!r}"
        hint = closest(key, allowed)
        if hint:
            msg += f"; did you mean {hint!r}?"
        return msg + (f" allowed: {', '.join(allowed)}" if allowed else "")
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",") if c.strip()]
        msg = f"must be one of: {', '.join(choices)} (got {given!r})"
        hint = closest(str(given), choices)
        return msg + (f"; did you mean {hint!r}?" if hint and hint != given else "")
    text = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text[0].lower() + text[1:] if text else text
    text = text.replace("input should be", "must be").replace("Input should be", "must be")
    if kind not in ("value_error", "assertion_error") and not isinstance(given, dict | list):
        text += f" (got {given!r})"
    return text


def _dispatch(
    rep: _Reporter, raw: Any, loc: Loc, field: str, kind: str, registry: Any, base: type[BaseModel], context: dict
) -> Any:
    """Validate a mapping whose `field` picks its config class from a registry."""
    if not isinstance(raw, dict):
        rep.add(loc, f"must be a mapping with a {field!r} key (got {type(raw).__name__})")
        return None
    name = raw.get(field)
    if name is None:
        rep.add(loc, f"required key {field!r} is missing; known {kind}s: {', '.join(registry.names())}")
        return None
    if not isinstance(name, str) or name not in registry:
        rep.add((*loc, field), unknown_message(kind, name, registry.names()))
        return None
    cls, why = registry.try_get(name)
    if cls is None:
        rep.add((*loc, field), str(why))
        return None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        rep.add((*loc, field), f"{kind} {name!r} is registered with {cls!r}, which is not a {base.__name__}")
        return None
    try:
        return cls.model_validate(raw, context=context)
    except ValidationError as exc:
        rep.add_validation_error(exc, loc, cls)
        return None


def validate_recipe_data(
    data: Any,
    doc: YamlDocument | None = None,
    base_dir: Path | None = None,
    overrides: Sequence[Override] = (),
    check_paths: bool = True,
    allow_code: bool = False,
) -> Recipe:
    """Validate plain recipe data; raise RecipeError listing every problem. `allow_code`: the command line's
    --allow-code (a `python:` model runs the user's code)."""
    from compresspipe.data import DATASETS
    from compresspipe.stages import STAGES

    doc = doc or YamlDocument(data, "<recipe>", {}, {})
    rep = _Reporter(doc, overrides)
    context = {"base_dir": base_dir, "check_paths": check_paths, "allow_code": allow_code}
    if not isinstance(data, dict):
        rep.add((), f"a recipe is a mapping of keys at top level (got {type(data).__name__})")
        raise RecipeError(rep.problems)

    version = data.get("compresspipe")
    if "compresspipe" not in data:
        rep.add((), f"required key 'compresspipe' is missing: the recipe format version (use compresspipe: {RECIPE_VERSION})")
    elif version != RECIPE_VERSION:
        rep.add(("compresspipe",), f"unsupported recipe format version {version!r}; this compresspipe reads {RECIPE_VERSION}")

    top = {k: v for k, v in data.items() if k not in ("data", "stages", "compresspipe")}
    top["compresspipe"] = RECIPE_VERSION
    top["data"] = DataConfig.model_construct(dataset="?")
    top["stages"] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(top, context=context)
    except ValidationError as exc:
        rep.add_validation_error(exc, (), Recipe)

    data_cfg = None
    if "data" not in data:
        rep.add((), "required key 'data' is missing (e.g. data: {dataset: digits})")
    else:
        data_cfg = _dispatch(rep, data["data"], ("data",), "dataset", "dataset", DATASETS, DataConfig, context)

    stages: list[StageConfig] = []
    raw_stages = data.get("stages", [])
    if raw_stages is None:
        raw_stages = []
    if not isinstance(raw_stages, list):
        rep.add(("stages",), f"must be a list of stages (got {type(raw_stages).__name__})")
        raw_stages = []
    for i, raw in enumerate(raw_stages):
        cfg = _dispatch(rep, raw, ("stages", i), "type", "stage", STAGES, StageConfig, context)
        if cfg is not None:
            stages.append(cfg)

    _name_stages(rep, raw_stages, stages)
    if rep.problems or recipe is None or data_cfg is None:
        raise RecipeError(rep.problems)

    recipe = Recipe.model_validate(
        {**recipe.model_dump(exclude={"data", "stages"}), "data": data_cfg, "stages": stages}, context=context
    )
    _check_model_task(rep, recipe)
    lowered: int | None = None  # the first stage that leaves low-precision layers
    for i, stage in enumerate(recipe.stages):
        for sub, message in stage.check(recipe, i):
            rep.add(("stages", i, *sub), message)
        if lowered is not None and stage.needs_float_model:
            first = recipe.stages[lowered]
            rep.add(("stages", i, "type"), f"{stage.type} cannot run after stages[{lowered}] ({first.name}, "
                                           f"{first.type}): the model then holds low-precision layers it cannot "
                                           f"change; put {first.type} after it (only export may follow)")
        if lowered is None and stage.makes_low_precision():
            lowered = i
        if stage.expect is not None:
            for sub, message in _check_limits(recipe, stage.expect):
                rep.add(("stages", i, "expect", *sub), message)
    if recipe.gates is not None:
        if recipe.gates.stage is not None and recipe.gates.stage not in recipe.stage_names():
            rep.add(("gates", "stage"), unknown_message("stage name", recipe.gates.stage, recipe.stage_names()))
        for sub, message in _check_limits(recipe, recipe.gates):
            rep.add(("gates", *sub), message)
    if rep.problems:
        raise RecipeError(rep.problems)
    return recipe


def _check_model_task(rep: _Reporter, recipe: Recipe) -> None:
    """The model can do the recipe's task (a Hugging Face model type has the task's Auto class)."""
    from compresspipe.recipe.spec import HuggingFaceConfig, hf_unsupported, read_hf_folder

    hf = recipe.model.huggingface
    if hf is None:
        return
    try:
        config = hf.config if isinstance(hf, HuggingFaceConfig) else read_hf_folder(Path(hf))
    except ValueError:
        return  # reported by the model block's own validation
    why = hf_unsupported(recipe.task, str(config.get("model_type")))
    if why:
        rep.add(("model", "huggingface"), why)
    # a sequence longer than the model's position table fails deep in its forward: say so here, before anything runs
    seq_len = getattr(recipe.data, "seq_len", None)
    for key in ("max_position_embeddings", "n_positions"):
        limit = config.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and isinstance(seq_len, int) and seq_len > limit:
            rep.add(("data", "seq_len"), f"{seq_len} tokens per sample, but the model ({config.get('model_type')}) "
                                         f"takes at most {limit} positions (its config's {key}); lower data.seq_len "
                                         f"to {limit} or less, or raise {key}")
            break


def _check_limits(recipe: Recipe, limits: Any) -> list[tuple[Loc, str]]:
    from compresspipe.metrics import METRICS
    from compresspipe.metrics.tasks import TASKS

    problems: list[tuple[Loc, str]] = []
    info = TASKS[recipe.task]
    for key in ("max_accuracy_drop", "min_accuracy", "min_reference_accuracy"):
        if getattr(limits, key, None) is not None and not info.has_accuracy:
            problems.append(((key,), f"task {recipe.task} has no top-1 accuracy; judge its metric instead, e.g. "
                                     f"max_drop: {{{info.default_metric}: ...}}"))
    for key in ("max_drop", "target"):
        for name in getattr(limits, key) or {}:
            if name == "loss":
                continue
            if name not in METRICS:
                problems.append(((key, name), unknown_message("metric", name, [*METRICS.names(), "loss"])))
                continue
            cls, why = METRICS.try_get(name)
            if cls is None:
                problems.append(((key, name), str(why)))
            elif recipe.task not in getattr(cls, "tasks", (recipe.task,)):
                problems.append(((key, name), f"metric {name} does not apply to task {recipe.task}; its metrics: "
                                              f"{', '.join(info.metrics)}"))
    sizes = recipe.deploy_batch_sizes()
    if limits.latency_batch_size is not None and limits.latency_batch_size not in sizes:
        problems.append((("latency_batch_size",),
                         f"{limits.latency_batch_size} is not measured; the deploy batch sizes are {sizes} "
                         "(deploy.batch_sizes, default evaluate.latency.batch_sizes)"))
    if limits.format is not None:
        missing = runtime_missing(FORMAT_RUNTIME[limits.format])
        if missing:
            problems.append((("format",), f"format {limits.format} cannot be measured here: {missing}"))
    if limits.min_speedup is not None and not recipe.evaluate.latency.enabled:
        problems.append((("min_speedup",), "needs latency measurement (evaluate.latency.enabled: true)"))
    if not recipe.stages and limits.checks():
        problems.append(((), "there is no stage to judge: the recipe has no stages"))
    return problems


def _name_stages(rep: _Reporter, raw_stages: list, stages: list[StageConfig]) -> None:
    """Give each stage a unique name: its own, else its type (then type-2, type-3, ...)."""
    if len(stages) != len(raw_stages):
        return
    taken: dict[str, int] = {}
    reserved = {"baseline"}
    for i, stage in enumerate(stages):
        if stage.name is not None:
            if stage.name in reserved:
                rep.add(("stages", i, "name"), f"{stage.name!r} is reserved for the unmodified model")
            elif stage.name in taken:
                rep.add(("stages", i, "name"), f"duplicate stage name {stage.name!r} (also stages[{taken[stage.name]}])")
            taken[stage.name] = i
    for i, stage in enumerate(stages):
        if stage.name is None:
            name, n = stage.type, 2
            while name in taken or name in reserved:
                name, n = f"{stage.type}-{n}", n + 1
            stage.name = name
            taken[name] = i


def _resolve(path: Path, overrides: Iterable[str]) -> tuple[Any, Any, YamlDocument, list[Override]]:
    """(data before variables are substituted, recipe data, document, overrides) in the documented order."""
    doc = load_composed(path)
    parsed = join_dotted_keys(doc.data, parse_overrides(list(overrides)))
    raw, parsed = apply_overrides(copy.deepcopy(doc.data), parsed)
    set_vars = {str(ov.loc[1]): ov.raw for ov in parsed if len(ov.loc) == 2 and ov.loc[0] == "vars"}
    data = substitute_vars(copy.deepcopy(raw), doc, set_vars)
    return raw, data, doc, parsed


def resolve_recipe_data(path: str | Path, overrides: Iterable[str] = ()) -> tuple[Any, YamlDocument, list[Override]]:
    """Recipe data in the documented order: `extends` merged, then `--set` overrides, then `${vars.x}`."""
    _, data, doc, parsed = _resolve(Path(path), overrides)
    return data, doc, parsed


@dataclass
class LoadedRecipe:
    """A validated recipe with what it was read from: the data before `${vars.x}` substitution (what a search
    varies), the document (lines and columns) and the `--set` overrides, to point at a value later."""

    recipe: Recipe
    raw: dict[str, Any]
    doc: YamlDocument
    overrides: list[Override]
    base_dir: Path

    def error(self, loc: Loc, message: str) -> RecipeError:
        """A problem found after validation (e.g. a storage that cannot be reached), at the value's line."""
        rep = _Reporter(self.doc, self.overrides)
        rep.add(loc, message)
        return RecipeError(rep.problems)


def load_recipe_source(path: str | Path, overrides: Iterable[str] = (), check_paths: bool = True,
                       allow_code: bool = False) -> LoadedRecipe:
    """Read, compose, override and validate a recipe file, its search block included (`allow_code`: --allow-code
    was given)."""
    path = Path(path)
    raw, data, doc, parsed = _resolve(path, overrides)
    base_dir = path.resolve().parent
    recipe = validate_recipe_data(data, doc, base_dir=base_dir, overrides=parsed, check_paths=check_paths,
                                  allow_code=allow_code)
    if recipe.search is not None:
        _check_search(raw, recipe, doc, parsed, base_dir, check_paths, allow_code)
    return LoadedRecipe(recipe, raw, doc, parsed, base_dir)


def load_recipe(path: str | Path, overrides: Iterable[str] = (), check_paths: bool = True,
                allow_code: bool = False) -> Recipe:
    """Read, compose, override and validate a recipe file (`allow_code`: --allow-code was given)."""
    return load_recipe_source(path, overrides, check_paths, allow_code).recipe


def _check_search(raw: Any, recipe: Recipe, doc: YamlDocument, overrides: Sequence[Override], base_dir: Path,
                  check_paths: bool, allow_code: bool = False) -> None:
    """The search block's rules that need the whole recipe: each space value gives a valid recipe, objectives and
    pick name figures the report has, early_stop names an intermediate stage."""
    from compresspipe.recipe.search import search_problems

    spec = recipe.search
    if spec is None:
        return

    def validate(data: dict[str, Any]) -> list[str]:
        try:
            validate_recipe_data(data, None, base_dir=base_dir, check_paths=check_paths, allow_code=allow_code)
        except RecipeError as exc:
            return [f"{p.path}: {p.message}" if p.path else p.message for p in exc.problems]
        return []

    rep = _Reporter(doc, overrides)
    for loc, message in search_problems(raw, spec, recipe.stage_names(), recipe.deploy_batch_sizes(), validate,
                                        recipe.evaluate.latency.enabled):
        rep.add(("search", *loc), message, key=len(loc) == 2 and loc[0] in ("space", "objectives", "pick"))
    if rep.problems:
        raise RecipeError(rep.problems)
