"""`compresspipe validate`: check recipes without running them (no torch import)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from compresspipe.cli.base import EXIT_INPUT, app, handle_errors


@app.command()
@handle_errors
def validate(
    recipes: list[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set stages.0.epochs=3"),
    print_: bool = typer.Option(False, "--print", help="Print the resolved recipe (defaults filled in)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Accept python: model sources (they run code)."),
) -> None:
    """Check recipes: every problem is reported with file, line, column and key path."""
    from rich.console import Console

    from compresspipe.cli.base import escape
    from compresspipe.errors import RecipeError
    from compresspipe.recipe import load_recipe
    from compresspipe.recipe.yamlio import dump_yaml

    out, err = Console(highlight=False), Console(stderr=True, highlight=False, soft_wrap=True)
    failed = False
    results = []
    for path in recipes:
        try:
            recipe = load_recipe(path, set_, allow_code=allow_code)
        except RecipeError as exc:
            failed = True
            results.append({"file": str(path), "ok": False, "problems": [
                {"file": p.file, "line": p.line, "column": p.column, "path": p.path, "message": p.message}
                for p in exc.problems]})
            for problem in exc.problems:
                err.print(f"[bold red]error:[/] {escape(str(problem))}")
            continue
        results.append({"file": str(path), "ok": True, "problems": [], "recipe": recipe.to_data()})
        if json_out:
            continue
        if print_:
            out.print(escape(dump_yaml(recipe.to_data())), end="")
        else:
            out.print(f"ok: {escape(str(path))} ({recipe.name}, {len(recipe.stages)} stage(s): "
                      f"{', '.join(recipe.stage_names()) or 'none'})")
    if json_out:
        print(json.dumps({"ok": not failed, "recipes": results}, indent=2))
    if failed:
        raise typer.Exit(EXIT_INPUT)
