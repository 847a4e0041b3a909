"""Terminal output: progress while work runs, logs, and the console the CLI prints tables to.

On a terminal, every step shows a live bar (with the time left when its total is known); steps nest (the
export of one format inside a stage, the calibration inside it) and share one display. Without a terminal
(CI logs, files), nothing is redrawn: a plain line says what started, and while anything runs a line says
where it is at least every 30 seconds, so a CI log never stays silent for long.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

HEARTBEAT_S = 30.0  # without a terminal: the longest silence while work runs


class _Bar:
    """One step of work: `advance(n, info)` moves it, `update(description, info)` relabels it."""

    def __init__(self, ui: UI, task: TaskID | None, description: str, total: int | None):
        self.ui, self.task, self.description, self.total = ui, task, description, total
        self.done, self.info, self.started = 0, "", time.monotonic()

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info or self.info
        if self.task is not None and self.ui.live is not None:
            self.ui.live.update(self.task, advance=n, info=info)

    def update(self, description: str | None = None, info: str | None = None) -> None:
        self.description = description or self.description
        self.info = self.info if info is None else info
        if self.task is not None and self.ui.live is not None:
            self.ui.live.update(self.task, description=self.description, info=self.info)

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.description}: "
        if self.total:
            text += f"{self.done}/{self.total}"
            if self.done:
                text += f", about {elapsed / self.done * (self.total - self.done):.0f}s left"
        else:
            text += "working"
        return text + f" ({elapsed:.0f}s){' ' + self.info if self.info else ''}"


class UI:
    def __init__(self, quiet: bool = False, stream: Any = None):
        self.quiet = quiet
        # the result table always goes to stdout; logs and progress go to stderr and are what quiet silences
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=False)
        if not self.console.is_terminal:
            # files and CI logs: the width COLUMNS asks for, else 120 (what CI log viewers show without wrapping)
            columns = os.environ.get("COLUMNS", "")
            self.console.width = int(columns) if columns.isdigit() and int(columns) >= 40 else 120
        self.err = Console(file=sys.stderr, quiet=quiet, highlight=False)
        self.live: Progress | None = None
        self.bars: list[_Bar] = []
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()

    def log(self, message: str) -> None:
        self.err.print(message)

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[_Bar]:
        """A step of work for as long as the block runs; nested steps share one display."""
        terminal = not self.quiet and self.err.is_terminal
        task = None
        with self._lock:
            if terminal and self.live is None:
                self.live = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=self.err, transient=True,
                )
                self.live.start()
            if self.live is not None:
                task = self.live.add_task(description, total=total, info="")
            bar = _Bar(self, task, description, total)
            self.bars.append(bar)
            if not terminal and not self.quiet and self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, daemon=True)
                self._heartbeat.start()
        try:
            yield bar
        finally:
            with self._lock:
                self.bars.remove(bar)
                if self.live is not None and task is not None:
                    self.live.remove_task(task)
                    if not self.bars:
                        self.live.stop()
                        self.live = None

    def _beat(self) -> None:
        """Without a terminal: while any step runs, say where the innermost one is every HEARTBEAT_S."""
        last = time.monotonic()
        while True:
            time.sleep(1.0)
            with self._lock:
                if not self.bars:
                    self._heartbeat = None
                    return
                if time.monotonic() - last >= HEARTBEAT_S:
                    self.err.print(self.bars[-1].status())
                    last = time.monotonic()


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# the libraries whose log warnings become notes (their Python warnings are caught whoever raises them)
LIBRARY_LOGGERS = ("torch", "transformers", "timm", "torch_pruning", "torchao", "onnxscript", "onnx_ir",
                   "onnxruntime", "executorch")
MAX_WARNING_NOTES = 5  # distinct warnings kept per block; the rest are counted


def strip_ansi(text: str) -> str:
    """Text without terminal escape codes (colours a library put in its message), for files."""
    return ANSI.sub("", text)


@contextmanager
def library_messages(notes: list[str], prefix: str = "warning") -> Iterator[None]:
    """Python warnings and the log warnings of the libraries we drive (torch's, transformers', Torch-Pruning's),
    raised inside the block, become notes (`prefix: Category: first line`), each once and without escape codes,
    instead of raw lines in the terminal: the report keeps them, the terminal keeps what the user must act on.
    Nothing is dropped unseen: past MAX_WARNING_NOTES distinct messages, the rest are counted. Nothing is changed
    outside the block."""
    seen: list[str] = []

    def add(source: str, text: str) -> None:
        first = strip_ansi(text).strip().splitlines()
        line = f"{source}: {first[0].strip() if first else ''}"[:300]
        if line not in seen:
            seen.append(line)

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            add(record.name, record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    add(w.category.__name__, str(w.message))
    finally:
        for lg, handlers, propagate in saved:
            # a library that set up its logging inside the block (torch's on import) keeps what it set
            added = [h for h in lg.handlers if h is not handler]
            lg.handlers = added or handlers
            lg.propagate = propagate
        notes += [f"{prefix}: {line}" for line in seen[:MAX_WARNING_NOTES] if f"{prefix}: {line}" not in notes]
        if len(seen) > MAX_WARNING_NOTES:
            notes.append(f"{prefix}: {len(seen) - MAX_WARNING_NOTES} more distinct warning(s)")
