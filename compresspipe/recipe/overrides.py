"""`--set stages.0.epochs=3` overrides: dotted key paths, values parsed as YAML, validated like the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compresspipe.errors import Problem, RecipeError
from compresspipe.recipe.yamlio import Loc, format_loc, parse_yaml_text
from compresspipe.registry import closest


@dataclass(frozen=True)
class Override:
    raw: str
    loc: Loc
    value: Any


def parse_overrides(items: list[str]) -> list[Override]:
    out: list[Override] = []
    problems: list[Problem] = []
    for raw in items:
        key, sep, text = raw.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"--set {raw}", None, None, "", "expected KEY=VALUE, e.g. --set stages.0.epochs=3"))
            continue
        parts: list[str | int] = []
        for part in key.split("."):
            if not part:
                problems.append(Problem(f"--set {raw}", None, None, "", f"empty part in key path {key!r}"))
                break
            parts.append(int(part) if part.isdigit() else part)
        else:
            try:
                value = parse_yaml_text(text, f"--set {raw}").data if text.strip() else None
            except RecipeError as exc:
                problems.extend(exc.problems)
                continue
            out.append(Override(raw, tuple(parts), value))
    if problems:
        raise RecipeError(problems)
    return out


def join_dotted_keys(data: Any, overrides: list[Override]) -> list[Override]:
    """Overrides whose key path reaches a key that itself holds dots (a search space's `vars.width`) by joining the
    parts that name it: `search.space.vars.width.high` sets `high` of the key `vars.width`."""
    out = []
    for ov in overrides:
        node, parts, loc, i = data, list(ov.loc), [], 0
        while i < len(parts):
            part = parts[i]
            if isinstance(node, dict):
                for j in range(len(parts), i + 1, -1):
                    joined = ".".join(str(p) for p in parts[i:j])
                    if joined in node:
                        part, i = joined, j - 1
                        break
                node = node.get(str(part)) if isinstance(node, dict) else None
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            elif isinstance(node, list) and isinstance(part, str) and part in (names := stage_names(node)):
                node = node[names.index(part)]  # a stage by name; apply_overrides turns it into its index
            else:
                node = None
            loc.append(part)
            i += 1
        out.append(Override(ov.raw, tuple(loc), ov.value))
    return out


def stage_names(items: list[Any]) -> list[str | None]:
    """The names a list of stages gets (its own `name`, else its type made unique: prune, prune-2, ...)."""
    taken = {item["name"] for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)}
    names: list[str | None] = []
    for item in items:
        if not isinstance(item, dict):
            names.append(None)
        elif isinstance(item.get("name"), str):
            names.append(item["name"])
        elif isinstance(item.get("type"), str):
            name, n = item["type"], 2
            while name in taken or name == "baseline":
                name, n = f"{item['type']}-{n}", n + 1
            taken.add(name)
            names.append(name)
        else:
            names.append(None)
    return names


def apply_overrides(data: Any, overrides: list[Override]) -> tuple[Any, list[Override]]:
    """Set each override's value into data, creating mappings as needed; lists are indexed, not grown.

    A list of stages may also be addressed by stage name (`stages.prune.amount`), as `extends` matches them.
    Returns the data and the overrides with names resolved to indexes (so errors still point at the --set).
    """
    problems: list[Problem] = []
    resolved: list[Override] = []
    for ov in overrides:
        loc = list(ov.loc)
        if not isinstance(data, dict):
            data = {}
        node: Any = data
        for depth, part in enumerate(ov.loc):
            last = depth == len(ov.loc) - 1
            where = format_loc(ov.loc[: depth + 1])
            if isinstance(node, list) and isinstance(part, str):
                names = stage_names(node)
                if part in names:
                    part = names.index(part)
                    loc[depth] = part
                else:
                    known = [n for n in names if n]
                    hint = closest(part, known)
                    problems.append(Problem(f"--set {ov.raw}", None, None, where,
                                            f"no stage named {part!r}" + (f"; did you mean {hint!r}?" if hint else "")
                                            + f" stages: {', '.join(known) or '(none)'} (or use an index from 0)"))
                    break
            if isinstance(node, list):
                if not isinstance(part, int) or not 0 <= part < len(node):
                    problems.append(
                        Problem(f"--set {ov.raw}", None, None, where,
                                f"no list item {part!r} (the list has {len(node)} item(s), indexes from 0)")
                    )
                    break
            elif isinstance(node, dict):
                part = str(part)
                if not last and not isinstance(node.get(part), dict | list):
                    node[part] = {}
            else:
                problems.append(Problem(f"--set {ov.raw}", None, None, where, "cannot set a key inside a plain value"))
                break
            if last:
                node[part] = ov.value
                resolved.append(Override(ov.raw, tuple(loc), ov.value))
            else:
                node = node[part]
    if problems:
        raise RecipeError(problems)
    return data, resolved
