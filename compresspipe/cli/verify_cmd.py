"""`compresspipe verify RUN_DIR`: re-run a finished run's locked recipe and compare."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from compresspipe.cli import EXIT_GATE, app, handle_errors


@app.command()
@handle_errors
def verify(
    run_dir: Path = typer.Argument(..., help="A finished run folder (with recipe.lock.yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Let a python: model source run its file's code."),
) -> None:
    """Re-run the locked recipe of RUN_DIR and check metrics, files and weight hashes (exit 0 or 1)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from compresspipe.models.code import allowing_code
    from compresspipe.run.verify import verify_run

    with allowing_code(allow_code):
        result = verify_run(run_dir)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        table = Table(title=f"verify {escape(str(run_dir))}", title_justify="left")
        for col in ("stage", "result", "details"):
            table.add_column(col)
        for row in result["stages"]:
            table.add_row(escape(row["stage"]), "ok" if row["ok"] else "[bold red]FAIL[/]",
                          escape("; ".join(row["problems"])))
        Console(highlight=False, width=160).print(table)
    if not result["ok"]:
        bad = ", ".join(r["stage"] for r in result["stages"] if not r["ok"])
        Console(stderr=True).print(f"[bold red]error:[/] run does not reproduce: {escape(bad)}")
        raise typer.Exit(EXIT_GATE)
