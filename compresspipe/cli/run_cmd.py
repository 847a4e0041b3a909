"""`compresspipe run`: execute a recipe into a run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from compresspipe.cli.base import app, handle_errors


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
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train data-parallel in N processes (torch.distributed)."),
    wide: bool = typer.Option(False, "--wide", help="Print every column of the table, whatever the terminal width."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Let a python: model source run its file's code."),
) -> None:
    """Run a recipe: baseline, every stage in order, a reloadable model after each, and a report."""
    from compresspipe.recipe import load_recipe

    parsed = load_recipe(recipe, set_, allow_code=allow_code)  # validate all before importing torch or launching
    if nproc > 1:
        from compresspipe.training.distributed import launched_by_torchrun

        if not launched_by_torchrun():
            argv = [str(recipe), *(["--out", str(out)] if out else []), *(["--resume"] if resume else []),
                    *(["--force"] if force else []), *[a for s in set_ for a in ("--set", s)],
                    *(["-q"] if quiet else []), *(["--junit", str(junit)] if junit else []),
                    *(["--json"] if json_out else []), *(["--wide"] if wide else []),
                    *(["--allow-code"] if allow_code else [])]
            raise typer.Exit(launch(nproc, argv))
    from compresspipe.run.executor import RunOptions, run_recipe
    from compresspipe.ui import UI

    ui = UI(quiet=quiet, stream=sys.stderr if json_out else None)
    if parsed.search is not None:
        ui.log("the recipe has a search: block; run runs it as written (the variables' own values), "
               "`compresspipe search` runs the search")
    options = RunOptions(out=out, resume=resume, force=force, junit=junit, allow_code=allow_code)
    folder = out or Path("runs") / parsed.name
    try:
        result = run_recipe(parsed, recipe, options, ui)
    except BaseException as exc:
        from compresspipe.errors import InputError, RecipeError, RunFolderError

        if isinstance(exc, RunFolderError | RecipeError | InputError):  # nothing ran: an old report is not news
            raise
        report = getattr(exc, "report", None) or _written_report(folder)
        if report and report.get("stages"):
            _print_table(ui, report, folder, wide)
        if json_out and report is not None:
            print(_json(report))
        raise
    if result.report:  # other ranks of a data-parallel run have none
        _print_table(ui, result.report, result.folder, wide)
        if json_out:
            print(_json(result.report))


def _print_table(ui: Any, report: dict, folder: Path, wide: bool = False) -> None:
    from compresspipe.report.build import render_table

    table, hidden = render_table(report, 10_000 if wide else ui.console.width)
    ui.console.print(table)
    if hidden:
        ui.console.print(f"left out at {ui.console.width} columns: {', '.join(hidden)} (--wide, or report.md)")
    ui.console.print(f"run folder: {folder}")


def _written_report(folder: Path) -> dict | None:
    """report.json as the run left it (failed or interrupted runs write one too), if it is there."""
    try:
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _json(report: dict) -> str:
    from compresspipe.artifacts.files import dumps

    return dumps(report)


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run `compresspipe run ARGV` in `nproc` processes under PyTorch's elastic launcher.

    Returns the exit code to use: the workers' own (2 input, 3 stage failure, 130 interrupted, 143 terminated)
    when one failed, else 0. Ctrl-C or SIGTERM sent to this launcher (torch's agent handles them here: it passes
    the signal on to the workers, which stop as a run does) is the same interrupt as without --nproc.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as elastic_run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "compresspipe", "run", *argv]
    )
    try:
        elastic_run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        # a rank that failed on its own comes first: when one rank fails, the launcher sends the others SIGTERM,
        # and their 143 is the consequence, not the cause
        own = [c for c in codes if c in (1, 2, 3)] + [c for c in codes if c in (130, 143)]
        return own[0] if own else 3
    except SignalException as exc:
        from compresspipe.errors import mark_interrupted

        mark_interrupted(int(exc.sigval))
        raise KeyboardInterrupt from None
    return 0
