"""`--set stages.0.epochs=3` overrides: dotted key paths, values parsed as YAML, validated like the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compresspipe.errors import Problem, RecipeError
from compresspipe.recipe.yamlio import Loc, format_loc, parse_yaml_text


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
            else:
                node = None
            loc.append(part)
            i += 1
        out.append(Override(ov.raw, tuple(loc), ov.value))
    return out


def apply_overrides(data: Any, overrides: list[Override]) -> Any:
    """Set each override's value into data, creating mappings as needed; lists are indexed, not grown."""
    problems: list[Problem] = []
    for ov in overrides:
        if not isinstance(data, dict):
            data = {}
        node: Any = data
        for depth, part in enumerate(ov.loc):
            last = depth == len(ov.loc) - 1
            where = format_loc(ov.loc[: depth + 1])
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
            else:
                node = node[part]
    if problems:
        raise RecipeError(problems)
    return data
