"""`compresspipe search`: run a recipe's search: block on Optuna, or join, or re-pick from a finished search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from compresspipe.cli.base import EXIT_GATE, EXIT_INPUT, app, fail, handle_errors
from compresspipe.errors import interrupt_exit_code, interruption


@app.command()
@handle_errors
def search(
    recipe: Path | None = typer.Argument(None, help="Recipe file with a search: block (not with --join)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Search folder (default: runs/<recipe name>-search)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Run N local worker processes."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads per worker (default: the "
                                                                      "cores shared among the workers)."),
    join: str | None = typer.Option(None, "--join", help="Add workers to a running search: its folder (shared file "
                                                         "system) or its storage URL (postgresql://...)."),
    study: str | None = typer.Option(None, "--study", help="With --join URL: the study (default: the only one)."),
    pick: str | None = typer.Option(None, "--pick", help="Re-pick from the finished trials, running none: "
                                                         "'minimize=latency_b1,max_accuracy_drop=0.005'."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set search.n_trials=4"),
    force: bool = typer.Option(False, "--force", help="Delete the study's trials and start the search over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print the final table."),
    json_out: bool = typer.Option(False, "--json", help="Print search.json on stdout; the table goes to stderr."),
    worker_index: int | None = typer.Option(None, "--worker-index", hidden=True),
    no_outputs: bool = typer.Option(False, "--no-outputs", hidden=True),
) -> None:
    """Search recipe values with Optuna: every trial an ordinary run, the Pareto front, and best.yaml."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        fail("compresspipe search needs Optuna: pip install 'compresspipe[search]'", EXIT_INPUT)
    from compresspipe.recipe.loader import load_recipe_source
    from compresspipe.search.driver import SearchOptions, join_setup, run_search, setup_from

    if join is not None:
        if recipe is not None or set_:
            fail("--join takes its recipe from the search it joins: give no recipe file and no --set", EXIT_INPUT)
        setup, loaded = join_setup(join, study, out)
    else:
        if recipe is None:
            return fail("give a recipe file with a search: block, or --join a search", EXIT_INPUT)
        loaded = load_recipe_source(recipe, set_)  # validate everything before importing torch or Optuna
        setup = setup_from(loaded, out)
    rule = _pick(pick, setup) if pick is not None else None
    from compresspipe.ui import UI

    ui = UI(quiet=quiet, stream=sys.stderr if json_out else None)
    import os

    # a process started by another worker (--worker-index) starts none itself; a worker joining from elsewhere
    # draws from its own seed
    index = worker_index if worker_index is not None else ((os.getpid() % 997) + 1) * 100 if join else 0
    options = SearchOptions(out=out, workers=workers, threads=threads, pick=rule, force=force, worker_index=index,
                            spawn=worker_index is None, joined=join is not None)
    result = run_search(setup, loaded, options, ui, write_outputs=not no_outputs)
    if no_outputs:
        raise typer.Exit(interrupt_exit_code() if result.interrupted else 0)
    _print(ui, setup, result.doc)
    if json_out:
        print(json.dumps(result.doc, indent=2))
    if result.interrupted:
        fail(f"{interruption()}; every finished trial is in the study: run the same command again to continue",
             interrupt_exit_code())
    if result.doc.get("picked") is None:
        fail(f"no trial to pick: {result.doc.get('pick_reason')}; best.yaml not written", EXIT_GATE)


def _pick(text: str, setup: object) -> dict:
    from compresspipe.errors import Problem, RecipeError
    from compresspipe.recipe.search import figure_names, parse_pick, pick_problems

    try:
        rule = parse_pick(text)
    except ValueError as exc:
        raise RecipeError([Problem(f"--pick {text}", None, None, "", str(exc))]) from None
    names = figure_names(setup.recipe.deploy_batch_sizes())  # type: ignore[attr-defined]
    problems = pick_problems(rule, names)
    if problems:
        raise RecipeError([Problem(f"--pick {text}", None, None, ".".join(map(str, loc)), message)
                           for loc, message in problems])
    return rule


def _print(ui: object, setup: object, doc: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from compresspipe.search.results import table_rows

    header, rows = table_rows(setup, doc)  # type: ignore[arg-type]
    table = Table(title=f"search: {escape(doc['recipe'])} (study {escape(doc['study'])}, {len(rows)} trial(s); "
                        "* Pareto front)", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(escape(h), justify="right" if i == 0 or i > 1 + len(setup.spec.space) else "left",  # type: ignore[attr-defined]
                         no_wrap=True)
    for r in rows:
        table.add_row(*[escape(c) for c in r])
    console = ui.console  # type: ignore[attr-defined]
    console.print(table)
    folder = setup.folder  # type: ignore[attr-defined]
    console.print(f"pick: {escape(doc['pick_reason'])}")
    console.print(f"search folder: {folder} (search.html, search.json"
                  + (", best.yaml" if doc.get("picked") is not None else "") + ")")
