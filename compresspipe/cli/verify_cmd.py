"""`compresspipe verify RUN_DIR`: re-run a finished run's locked recipe and compare."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from compresspipe.cli.base import EXIT_GATE, app, handle_errors


@app.command()
@handle_errors
def verify(
    run_dir: Path = typer.Argument(..., help="A finished run folder (with recipe.lock.yaml)."),
    fast: bool = typer.Option(False, "--fast", help="Only check the files against their manifests and the lock "
                                                    "against the recipe: no re-run, seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Let a python: model source run its file's code."),
) -> None:
    """Check RUN_DIR's files and re-run its locked recipe: metrics, files, weight hashes.

    Exit 0: it reproduces (or, with --fast, its files are intact); 1: it does not; 2: its files are broken.
    """
    from rich.console import Console
    from rich.table import Table

    from compresspipe.cli.base import escape
    from compresspipe.models.code import allowing_code
    from compresspipe.run.verify import verify_run

    with allowing_code(allow_code):
        result = verify_run(run_dir, fast=fast)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        table = Table(title=f"verify {escape(str(run_dir))}", title_justify="left")
        for col in ("stage", "result", "details"):
            table.add_column(col)
        for row in result["stages"]:
            table.add_row(escape(row["stage"]), "ok" if row["ok"] else "[bold red]FAIL[/]",
                          escape("; ".join(row["problems"]) or row.get("details", "")))
        Console(highlight=False).print(table)
    if not result["ok"]:
        bad = ", ".join(r["stage"] for r in result["stages"] if not r["ok"]) or "; ".join(result["problems"])
        what = "files changed since the run" if fast else "run does not reproduce"
        Console(stderr=True).print(f"[bold red]error:[/] {what}: {escape(bad)}")
        raise typer.Exit(EXIT_GATE)
