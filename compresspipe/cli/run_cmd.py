"""`compresspipe run`: execute a recipe into a run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from compresspipe.cli import app, handle_errors


@app.command()
@handle_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last finished stage."),
    force: bool = typer.Option(False, "--force", help="Overwrite a finished or unfinished run in the folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set stages.0.epochs=3"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print the final table."),
    junit: Path | None = typer.Option(None, "--junit", help="Write the quality gates as a JUnit XML file."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json on stdout; the table and logs go to stderr."),
) -> None:
    """Run a recipe: baseline, every stage in order, a reloadable model after each, and a report."""
    from compresspipe.recipe import load_recipe

    parsed = load_recipe(recipe, set_)  # validate everything before importing torch
    from compresspipe.engine.executor import RunOptions, run_recipe
    from compresspipe.engine.ui import UI
    from compresspipe.errors import GateFailed

    ui = UI(quiet=quiet, stream=sys.stderr if json_out else None)
    options = RunOptions(out=out, resume=resume, force=force, junit=junit)
    try:
        result = run_recipe(parsed, recipe, options, ui)
    except GateFailed as exc:
        if json_out and exc.report is not None:
            print(json.dumps(exc.report, indent=2))
        raise
    if json_out:
        print(json.dumps(result.report, indent=2))
