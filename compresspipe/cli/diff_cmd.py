"""`compresspipe diff A.yaml B.yaml`: what differs between two recipes once defaults, bases and variables resolve.

Stages are matched by name, not position, so inserting a stage reads as one added stage rather than as a
change to every stage after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from compresspipe.cli.base import app, handle_errors

DIFF_FORMAT = "compresspipe.diff"
DIFF_VERSION = 1


def _show(value: Any) -> str:
    """JSON for one value; unset (null) fields inside a block are left out to keep the line short."""
    def drop_unset(v: Any) -> Any:
        return {k: drop_unset(x) for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    return json.dumps(drop_unset(value), sort_keys=True)


def _walk(a: Any, b: Any, path: str, out: list[dict[str, Any]]) -> None:
    """Field-by-field differences of two JSON-like values; lists compare as whole values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append({"change": "removed", "path": sub, "a": a[key], "b": None})
            elif key not in a:
                out.append({"change": "added", "path": sub, "a": None, "b": b[key]})
            else:
                _walk(a[key], b[key], sub, out)
    elif a != b or type(a) is not type(b):
        out.append({"change": "changed", "path": path, "a": a, "b": b})


def diff_recipes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences of two resolved recipes (`Recipe.to_data()`), stages matched by name."""
    changes: list[dict[str, Any]] = []
    _walk({k: v for k, v in a.items() if k != "stages"}, {k: v for k, v in b.items() if k != "stages"}, "", changes)
    stages_a = {str(s["name"]): s for s in a.get("stages") or []}
    stages_b = {str(s["name"]): s for s in b.get("stages") or []}
    order_b = list(stages_b)
    for name, stage in stages_a.items():
        if name not in stages_b:
            changes.append({"change": "removed", "path": f"stages[{name}]", "a": stage, "b": None})
        else:
            _walk(stage, stages_b[name], f"stages[{name}]", changes)
    for name, stage in stages_b.items():
        if name not in stages_a:
            changes.append({"change": "added", "path": f"stages[{name}]", "a": None, "b": stage,
                            "position": order_b.index(name)})
    common_a = [n for n in stages_a if n in stages_b]
    common_b = [n for n in stages_b if n in stages_a]
    if common_a != common_b:
        changes.append({"change": "reordered", "path": "stages", "a": common_a, "b": common_b})
    return changes


def describe(change: dict[str, Any]) -> str:
    """One line per change: `path: a -> b`, `+ path`, `- path`."""
    path, kind = change["path"], change["change"]
    is_stage = path.startswith("stages[") and path.endswith("]") and "." not in path
    if kind == "added":
        if is_stage:
            return f"+ {path} (type {change['b'].get('type')}, position {change['position']})"
        return f"+ {path}: {_show(change['b'])}"
    if kind == "removed":
        return f"- {path}" if is_stage else f"- {path}: {_show(change['a'])}"
    if kind == "reordered":
        return f"stages order: {', '.join(change['a'])} -> {', '.join(change['b'])}"
    return f"{path}: {_show(change['a'])} -> {_show(change['b'])}"


@app.command()
@handle_errors
def diff(
    recipe_a: Path = typer.Argument(..., help="First recipe (YAML)."),
    recipe_b: Path = typer.Argument(..., help="Second recipe (YAML)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Accept python: model sources (they run code)."),
) -> None:
    """Show what differs between two resolved recipes (defaults filled in), stages matched by name. Exit 0."""
    from rich.console import Console

    from compresspipe.cli.base import escape
    from compresspipe.recipe import load_recipe

    a, b = load_recipe(recipe_a, allow_code=allow_code), load_recipe(recipe_b, allow_code=allow_code)
    changes = diff_recipes(a.to_data(), b.to_data())
    if json_out:
        print(json.dumps({"format": DIFF_FORMAT, "version": DIFF_VERSION, "a": str(recipe_a), "b": str(recipe_b),
                          "equal": not changes, "changes": changes}, indent=2))
        return
    console = Console(highlight=False, soft_wrap=True)
    if not changes:
        console.print("no differences")
        return
    for change in changes:
        line = escape(describe(change))
        style = {"added": "green", "removed": "red"}.get(change["change"])
        console.print(f"[{style}]{line}[/]" if style else line)
