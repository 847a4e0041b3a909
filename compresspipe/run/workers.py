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
