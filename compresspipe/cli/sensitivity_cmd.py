"""`compresspipe sensitivity`: how much each layer of a stage matters, measured one layer at a time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from compresspipe.cli.base import EXIT_INPUT, app, fail, handle_errors


@app.command()
@handle_errors
def sensitivity(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML)."),
    stage: str | None = typer.Option(None, "--stage", help="Stage to measure (default: the first prune, quantize "
                                                           "or factorize stage)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Measure layers in N processes."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: runs/<name>-sensitivity)."),
    ratios: str | None = typer.Option(None, "--ratios", help="Settings to measure, e.g. 0.1,0.3,0.5 (prune: share of "
                                                             "channels removed; factorize: rank / full rank)."),
    samples: int = typer.Option(512, "--samples", min=1, help="Validation samples each change is scored on."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure every layer again (the cache is by model hash "
                                                            "and settings)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set stages.0.epochs=3"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print the final table."),
    json_out: bool = typer.Option(False, "--json", help="Print sensitivity.json on stdout; the table goes to stderr."),
) -> None:
    """Per layer of a stage: the accuracy after a one-shot change of that layer alone, without fine-tuning."""
    from compresspipe.recipe import load_recipe

    parsed = load_recipe(recipe, set_)
    values = None
    if ratios is not None:
        try:
            values = sorted({float(v) for v in ratios.split(",") if v.strip()})
        except ValueError:
            fail(f"--ratios {ratios}: give numbers separated by commas, e.g. 0.1,0.3,0.5", EXIT_INPUT)
        if not values or any(not 0 < v < 1 for v in values or []):
            fail(f"--ratios {ratios}: every ratio must be between 0 and 1 (exclusive)", EXIT_INPUT)
    from rich.markup import escape
    from rich.table import Table

    from compresspipe.sensitivity.command import run_sensitivity, table
    from compresspipe.ui import UI

    ui = UI(quiet=quiet, stream=sys.stderr if json_out else None)
    doc = run_sensitivity(parsed, recipe, stage, out, workers, values, samples, not no_cache, ui)
    header, rows = table(doc)
    t = Table(title=f"sensitivity: {escape(str(doc['stage']))} ({escape(str(doc['settings'].get('kind', '')))}), "
                    f"accuracy with one layer changed (points vs {100 * doc['baseline']['accuracy']:.2f}%)",
              title_justify="left")
    for i, h in enumerate(header):
        t.add_column(escape(h), justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*[escape(c) for c in r])
    ui.console.print(t)
    folder = doc["folder"]
    ui.console.print(f"{len(rows)} layer(s) in {doc['seconds']:.1f} s ({doc['measured_layers']} measured, "
                     f"{doc['cached_layers']} from the cache); sensitivity.json and sensitivity.html in {folder}")
    if json_out:
        print(json.dumps(doc, indent=2))
