"""Where compresspipe keeps what it can compute again (sensitivity curves, the names the model libraries know):
$COMPRESSPIPE_CACHE, default ~/.cache/compresspipe; and the private scratch folders a process keeps in the system's
temporary folder (`scratch_dir`), which a killed process cannot remove itself. Imports nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CACHE_ENV = "COMPRESSPIPE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compresspipe")


STALE_SCRATCH_S = 600.0  # a dead process's scratch folder untouched this long is removed by the next process


def scratch_dir(kind: str) -> Path:
    """A new private temporary folder, `compresspipe-<kind>-<pid>-XXXX`. The caller removes it (atexit, finally);
    a process killed with SIGKILL (an OOM killer, a CI job cancelled hard) cannot, so the folders of this kind left by
    processes that no longer run are removed first (`sweep_scratch`)."""
    sweep_scratch(kind)
    return Path(tempfile.mkdtemp(prefix=f"compresspipe-{kind}-{os.getpid()}-"))


def sweep_scratch(kind: str, older_than_s: float = STALE_SCRATCH_S) -> list[Path]:
    """Remove the `compresspipe-<kind>-<pid>-*` folders in the temporary folder whose process is gone and which have
    not changed for `older_than_s` seconds (a process of another container, whose pids this one cannot see, keeps
    writing to its folder). POSIX only: elsewhere nothing is removed. Returns what was removed."""
    if os.name != "posix":  # os.kill(pid, 0) asks only on POSIX (on Windows it would end the process)
        return []
    removed: list[Path] = []
    head = f"compresspipe-{kind}-"
    now = time.time()
    for path in Path(tempfile.gettempdir()).glob(f"{head}*-*"):
        pid = path.name[len(head):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            if not path.is_dir() or path.is_symlink() or now - path.stat().st_mtime < older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        return True
    return True
