"""The command line. The only place that picks exit codes and prints errors; imports no torch at start-up."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from compresspipe import __version__

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="compresspipe",
    help="Make a PyTorch model smaller and faster from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_STAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def fail(message: str, code: int) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Map compresspipe's exceptions to one clear message and an exit code; never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from compresspipe.errors import CompressPipeError, interrupted

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            fail("interrupted; finished stages are kept, continue with --resume", EXIT_INTERRUPTED)
        except CompressPipeError as exc:
            if interrupted():  # e.g. an import probe that Ctrl-C cut short reads as "not installed"
                fail("interrupted; finished stages are kept, continue with --resume", EXIT_INTERRUPTED)
            fail(_escape(str(exc)), exc.exit_code)
        return None

    return wrapper  # type: ignore[return-value]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """User text made safe for a terminal: control characters (escape sequences, carriage returns) become
    visible \\xNN escapes, so a recipe key cannot rewrite what the terminal shows."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(printable(text))


def _version(value: bool) -> None:
    if value:
        print(f"compresspipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Make a PyTorch model smaller and faster from one YAML recipe."""


from compresspipe.cli import (  # noqa: E402,F401
    compare_cmd,
    diff_cmd,
    init_cmd,
    plan_cmd,
    run_cmd,
    schema_cmd,
    search_cmd,
    sensitivity_cmd,
    stages_cmd,
    validate_cmd,
    verify_cmd,
)


def _on_sigint(signum: int, frame: object) -> None:
    from compresspipe.errors import mark_interrupted

    mark_interrupted()
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
