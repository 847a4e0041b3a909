"""The Typer app, exit codes and error printing every command module shares (the commands import this module, not
the package, so the package can import them without a cycle). Imports no torch."""

from __future__ import annotations

import re
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

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_STAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


def fail(message: str, code: int) -> None:
    from rich.console import Console

    from compresspipe.errors import redact_secrets

    message = redact_secrets(message)
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Map compresspipe's exceptions to one clear message and an exit code; never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from compresspipe.errors import CompressPipeError, interrupt_exit_code, interrupted, interruption

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            fail(f"{interruption()}; finished stages are kept, continue with --resume", interrupt_exit_code())
        except CompressPipeError as exc:
            if interrupted():  # e.g. an import probe that Ctrl-C cut short reads as "not installed"
                fail(f"{interruption()}; finished stages are kept, continue with --resume", interrupt_exit_code())
            fail(escape(str(exc)), exc.exit_code)
        except Exception:
            if interrupted():  # any error raised while the signal unwinds (a module half-imported) is the interrupt
                fail(f"{interruption()}; finished stages are kept, continue with --resume", interrupt_exit_code())
            raise
        return None

    return wrapper  # type: ignore[return-value]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """User text made safe for a terminal: control characters (escape sequences, carriage returns) become
    visible \\xNN escapes, so a recipe key cannot rewrite what the terminal shows."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def escape(text: str) -> str:
    """User text for rich markup: control characters made visible and markup escaped."""
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
