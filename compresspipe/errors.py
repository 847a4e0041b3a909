"""The named exceptions a user can meet. Only the CLI maps them to exit codes."""

from __future__ import annotations

import re
from dataclasses import dataclass

_INTERRUPTED: int | None = None  # the signal that interrupted this process (2 SIGINT, 15 SIGTERM)
SIGNAL_NAMES = {2: "interrupted (Ctrl-C, SIGINT)", 15: "terminated (SIGTERM, as CI sends when it cancels a job)"}


def mark_interrupted(signum: int = 2) -> None:
    """Ctrl-C (SIGINT) or SIGTERM arrived: an error raised while it unwinds is the interrupt, not a finding."""
    global _INTERRUPTED
    _INTERRUPTED = signum


def interrupted() -> bool:
    return _INTERRUPTED is not None


def interruption() -> str:
    """What stopped the process, in words (for run.json, report.json and the terminal)."""
    return SIGNAL_NAMES.get(_INTERRUPTED or 2, f"interrupted (signal {_INTERRUPTED})")


def interrupt_exit_code() -> int:
    """128 + the signal's number, as shells report it: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (_INTERRUPTED or 2)


_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)(?P<secret>[^\s@/]+)@")


def redact_secrets(text: str) -> str:
    """Text with the password of every URL in it replaced by *** (`postgresql://user:***@host/db`): messages,
    logs and files never show a storage's password, whatever echoes the URL."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)


class CompressPipeError(Exception):
    """Base of every error compresspipe raises on purpose; its message is for the user."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One mistake in a user's file: where it is and what is wrong."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return redact_secrets(text)


class RecipeError(CompressPipeError):
    """The recipe is not valid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in recipe:" if n > 1 else ""
        body = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{head}\n{body}" if head else body)


class InputError(CompressPipeError):
    """An input named by the recipe or command line (file, folder, model, data) cannot be used."""


class RegistryError(CompressPipeError):
    """A registry lookup failed: unknown name, name collision, or a plugin that failed to import."""


class RunFolderError(CompressPipeError):
    """The run folder cannot be used: it holds another run, or resume does not match the recipe."""


class ArtifactError(CompressPipeError):
    """A saved model artifact is missing, corrupt, or of an unknown format version."""


class StageError(CompressPipeError):
    """A stage failed while running; the stages before it are kept on disk."""

    exit_code = 3

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage '{stage}' failed: {message}")


class StageConfigError(CompressPipeError):
    """A stage found at run time that its config cannot apply to this model (e.g. a selector matches nothing)."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage '{stage}': {message}")


class RunStopped(CompressPipeError):
    """The caller stopped a run after a stage (a search's hopeless trial); the finished stages are kept."""

    exit_code = 1


class GateFailed(CompressPipeError):
    """A quality gate in the recipe was not met; every artifact was still written."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        self.report = report
        super().__init__(message)
