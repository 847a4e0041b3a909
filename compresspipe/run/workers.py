"""Worker processes that compresspipe starts itself (search workers, sensitivity workers)."""

from __future__ import annotations

import os
from pathlib import Path


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a worker process: this one's, with this compresspipe first on the import path (a worker
    must run the same code as the process that starts it, installed or not), and its share of the threads."""
    import compresspipe

    root = str(Path(compresspipe.__file__).resolve().parents[1])
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def stop_on_signals() -> None:
    """In a worker process: Ctrl-C and SIGTERM raise KeyboardInterrupt once, as in the command line's own process, so
    its `finally` blocks clean up and it exits 128 + the signal; a second signal does not cut that short."""
    import signal

    from compresspipe.errors import interrupted, mark_interrupted

    def handler(signum: int, frame: object) -> None:
        if interrupted():
            return
        mark_interrupted(signum)
        raise KeyboardInterrupt

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, handler)


def stopped_by_signal(returncode: int | None) -> int | None:
    """The signal (2 SIGINT, 15 SIGTERM) that stopped a worker, from its exit status (128 + n once it handled the
    signal, -n when the signal ended it before its handler was installed); None for any other exit."""
    for number in (2, 15):
        if returncode in (128 + number, -number):
            return number
    return None
