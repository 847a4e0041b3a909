"""Terminal output: rich tables and progress bars; quiet when not on a terminal or asked to be."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class UI:
    def __init__(self, quiet: bool = False, stream: Any = None):
        self.quiet = quiet
        # the result table always goes to stdout; logs and progress go to stderr and are what quiet silences
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=False)
        if not self.console.is_terminal:
            self.console.width = 200  # files and CI logs: never squeeze the table
        self.err = Console(file=sys.stderr, quiet=quiet, highlight=False)

    def log(self, message: str) -> None:
        self.err.print(message)

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Any]:
        """A progress bar; `advance(n, **fields)` moves it. Transient: the table stays clean."""
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.err, transient=True, disable=self.quiet or not self.err.is_terminal,
        )
        with progress:
            task = progress.add_task(description, total=total, info="")

            class _Bar:
                def advance(self, n: int = 1, info: str = "") -> None:
                    progress.update(task, advance=n, info=info)

                def update(self, description: str | None = None, info: str | None = None) -> None:
                    kw: dict[str, Any] = {}
                    if description is not None:
                        kw["description"] = description
                    if info is not None:
                        kw["info"] = info
                    progress.update(task, **kw)

            yield _Bar()
