"""`compresspipe plan`: what a recipe will do, before it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from compresspipe.cli.base import app, handle_errors


@app.command()
@handle_errors
def plan(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set stages.0.epochs=3"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Let a python: model source run its file's code."),
) -> None:
    """Dry run: resolve selectors, predict params and MACs per stage, warn about recipes that cannot deliver."""
    from rich.console import Console
    from rich.table import Table

    from compresspipe.cli.base import escape
    from compresspipe.recipe import load_recipe

    parsed = load_recipe(recipe, set_, allow_code=allow_code)
    from compresspipe.models.code import allowing_code
    from compresspipe.run.plan import plan_recipe

    with allowing_code(allow_code):
        result = plan_recipe(parsed)
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return
    console = Console(highlight=False)  # the terminal's width; long cells wrap instead of being cut
    table = Table(title=f"plan: {escape(parsed.name)} (no weights change, nothing written)", title_justify="left")
    for col in ("#", "stage", "type", "params", "MACs", "layers", "notes"):
        wraps = col in ("layers", "notes", "stage")
        table.add_column(col, no_wrap=not wraps, overflow="fold", ratio=2 if wraps else None)
    for row in result["stages"]:
        layers = ", ".join(f"{k}: {v}" for k, v in list(row["layers"].items())[:6])
        if len(row["layers"]) > 6:
            layers += f", ... ({len(row['layers'])} layers)"
        table.add_row(str(row["index"]), escape(str(row["name"])), row["type"], _count(row["params"]), _count(row["macs"]),
                      escape(layers), escape(_notes(row) if row["predicted"] else "not predicted"))
    console.print(table)
    d = result["deploy"]
    console.print(f"deploy: every figure will come from {d['runtime']} files"
                  + (f", int8 weights for cpu {d['cpu_target']}" if d["runtime"] != "torch" else "")
                  + f" (this machine: {escape(str(d['machine']['cpu']))}, {d['machine']['target']})")
    for w in result["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(w['stage'])}: {escape(w['message'])}")


def _notes(row: dict[str, Any]) -> str:
    """A row's notes for the terminal: what the user may act on; the libraries' own warnings (a dependency's
    deprecation, say) are counted here and listed in full by --json and in a run's report."""
    own = [n for n in row["notes"] if not n.startswith("warning: ")]
    heard = len(row["notes"]) - len(own)
    return "; ".join(own + ([f"{heard} library warning(s): plan --json lists them"] if heard else []))


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"
