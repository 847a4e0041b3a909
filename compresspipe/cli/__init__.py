"""The command line. The only place that picks exit codes and prints errors; imports no torch at start-up."""

from __future__ import annotations

import signal
import sys

from compresspipe.cli import (  # noqa: F401 - each registers its command on app
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
from compresspipe.cli.base import (  # noqa: F401 - what `compresspipe.cli` offers
    EXIT_GATE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE,
    EXIT_TERMINATED,
    app,
    escape,
    fail,
    handle_errors,
    printable,
)


def _on_signal(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM (what CI runners send when they cancel or time out a job) stop the command the same way:
    finished work is kept and the reports say `interrupted`. A second signal while that is being written is
    ignored, so the cleanup cannot be cut in half (SIGKILL still ends it; every file is written atomically)."""
    from compresspipe.errors import interrupted, mark_interrupted

    if interrupted():
        return
    mark_interrupted(signum)
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        app()
    except KeyboardInterrupt:
        from compresspipe.errors import interrupt_exit_code, interruption

        print(f"error: {interruption()}", file=sys.stderr)
        sys.exit(interrupt_exit_code())
