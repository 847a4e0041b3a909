"""The run folder: who holds it (an exclusive lock), what it holds (run.json), and what --force may remove.

Layout (default runs/<name>/):
  .lock               held (fcntl) by the run in progress; says its pid and host
  run.json            state of the run (status, recipe, inputs); what --resume reads
  recipe.lock.yaml    the resolved recipe, package versions, seed, device, input hashes
  00-baseline/ 01-<stage>/ ...   one folder per finished stage (written as .NN-name.partial, then renamed)
  report.json report.md report.html error.log
`--force` removes only these entries, and refuses a folder that holds anything else (a user's notes, a hidden
file, a folder or a link): what a run writes is told by name *and* kind (a run writes no links; a stage folder
holds its manifest), so a user's `2024-results/` or a link named `01-train` is never taken for a run's.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from compresspipe.artifacts.files import atomic_write_json, read_json
from compresspipe.artifacts.stage_folder import MANIFEST_FILE, METRICS_FILE, intact
from compresspipe.errors import RunFolderError

RUN_FORMAT = "compresspipe.run"
RUN_VERSION = 1
STATE_FILE = "run.json"
LOCK_FILE = ".lock"
REPORTS = ("report.json", "report.md", "report.html")
RUN_FILES = (STATE_FILE, "recipe.lock.yaml", "error.log", *REPORTS)
STAGE_DIR = re.compile(r"^\d{2,}-[A-Za-z0-9][A-Za-z0-9._-]*$")
PARTIAL_DIR = re.compile(r"^\.\d{2,}-[A-Za-z0-9][A-Za-z0-9._-]*\.partial$")
RANK_LOG = re.compile(r"^error\.rank\d+\.log$")
# what an atomic write of one of the run's files leaves if the process is killed (artifacts.files: mkstemp)
TEMP_FILE = re.compile(r"^\.(run\.json|recipe\.lock\.yaml|error\.log|error\.rank\d+\.log|report\.(json|md|html))"
                       r"\.[A-Za-z0-9_]+\.tmp$")


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values (what changed in a recipe)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path or '(root)'}: {a!r} -> {b!r}"]


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def stage_dirname(index: int, name: str) -> str:
    return f"{index:02d}-{name}"


class RunFolder:
    """One run folder. `with folder.locked():` holds it against every other run until the block ends."""

    def __init__(self, path: Path):
        self.path = path
        self.state_file = path / STATE_FILE
        self._lock_fd: int | None = None
        self._created = False

    # -- the lock --------------------------------------------------------------------------------

    def locked(self) -> RunFolder:
        return self

    def __enter__(self) -> RunFolder:
        self._check_location()
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path}: a run is in progress there ({holder}); wait for it, or choose "
                                 "another folder with --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd  # the OS releases the lock when this process ends, however it ends
        return self

    def _open_lock(self) -> int:
        """The lock file, opened for writing only if it is a plain file of its own: never through a link (which
        would truncate the file it points to) or a hard link shared with another file."""
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise RunFolderError(f"{path}: cannot be used as the run's lock file ({exc.strerror}: a run writes a "
                                 "plain file there); remove it, or choose another folder with --out") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise RunFolderError(f"{path}: cannot be used as the run's lock file (not a plain file of its own, or "
                                 "a hard link to another file); remove it, or choose another folder with --out")
        return fd

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._lock_fd is not None:
            if not self.state_file.exists():  # refused before it started: leave the folder as it was found
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                if self._created and not any(self.path.iterdir()):
                    self.path.rmdir()
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_location(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: is a file, not a folder; choose a run folder with --out")
        if len(self.path.name.encode()) > 200:
            raise RunFolderError(f"{self.path}: the folder name is longer than 200 bytes; choose a shorter --out "
                                 "or recipe name")
        parent = next((p for p in [self.path, *self.path.parents] if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise RunFolderError(f"{parent}: not writable; choose a run folder you can write with --out")

    # -- what it holds ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        if not self.state_file.exists():
            return None
        try:
            state = read_json(self.state_file)
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def write_state(self, status: str, lock: dict[str, Any], **extra: Any) -> None:
        atomic_write_json(self.state_file, {
            "format": RUN_FORMAT, "version": RUN_VERSION, "status": status, "pid": os.getpid(),
            "host": socket.gethostname(), "recipe": lock["recipe"], "inputs": lock["inputs"],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
        })

    def ours(self, entry: Path) -> bool:
        """Whether a run writes this entry (so --force may remove it): its name and its kind. A run writes plain
        files and real folders, never links; a finished stage folder holds its manifest or metrics."""
        name = entry.name
        if entry.is_symlink():
            return False
        if name in RUN_FILES or name == LOCK_FILE or RANK_LOG.match(name) or TEMP_FILE.match(name):
            return entry.is_file()
        if PARTIAL_DIR.match(name):
            return entry.is_dir()
        if STAGE_DIR.match(name) and entry.is_dir():
            return any((entry / f).is_file() and not (entry / f).is_symlink() for f in (MANIFEST_FILE, METRICS_FILE))
        return False

    def clear(self) -> list[str]:
        """Remove what a run wrote (never the folder itself, never what a link points to); return what stays."""
        kept = []
        for entry in sorted(self.path.iterdir()):
            if entry.name == LOCK_FILE:
                continue
            if not self.ours(entry):
                kept.append(entry.name)
            elif entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            else:
                shutil.rmtree(entry)
        return kept

    def invalidate_reports(self) -> None:
        """A run that starts makes earlier reports stale: they go before anything else is written."""
        for name in REPORTS:
            (self.path / name).unlink(missing_ok=True)

    def completed(self, dirnames: list[str]) -> int:
        """How many leading stage folders (baseline included) are complete and intact."""
        n = 0
        for name in dirnames:
            if not intact(self.path / name):
                break
            n += 1
        return n

    def seed_from(self, donor: Path, dirnames: list[str], recipe: dict[str, Any], inputs: dict[str, Any]) -> int:
        """Start this (empty) folder from the leading finished stages of another run of the same recipe prefix.

        The stage folders are hard-linked (copied where links cannot be made: our files are replaced, never
        rewritten, so a link is safe) and run.json says `interrupted` after them, so `--resume` continues from
        there: it still refuses if the recipe or the inputs it fingerprints differ. Call with the lock held;
        returns the stages taken."""
        taken = 0
        for name in dirnames:
            if not intact(donor / name):
                break
            shutil.copytree(donor / name, self.path / name, copy_function=_link_or_copy)
            taken += 1
        if taken:
            atomic_write_json(self.state_file, {
                "format": RUN_FORMAT, "version": RUN_VERSION, "status": "interrupted", "pid": os.getpid(),
                "host": socket.gethostname(), "recipe": recipe, "inputs": inputs,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "completed": taken, "seeded_from": str(donor),
            })
        return taken

    # -- claiming it -------------------------------------------------------------------------------

    def claim(self, lock: dict[str, Any], dirnames: list[str], resume: bool, force: bool) -> tuple[int, list[str]]:
        """Decide where the run starts (0 = baseline) and clear what it replaces; call with the lock held.

        Returns (first stage index to run, names of foreign entries left in the folder by --force).
        """
        state = self.state()
        foreign = [e.name for e in self.path.iterdir() if not self.ours(e)]
        if state is not None:
            if resume and not force:
                changes = diff(state.get("recipe"), lock["recipe"])
                old_inputs: dict[str, Any] = state["inputs"] if isinstance(state.get("inputs"), dict) else {}
                if old_inputs != lock["inputs"]:
                    changes += [f"input {k} changed" for k in sorted(set(old_inputs) | set(lock["inputs"]))
                                if old_inputs.get(k) != lock["inputs"].get(k)]
                if changes:
                    shown = "\n  ".join(changes[:10])
                    raise RunFolderError(f"{self.path}: cannot resume, the recipe or its inputs changed since the "
                                         f"run started:\n  {shown}\nuse --force to start over")
                self.invalidate_reports()
                return self.completed(dirnames), []
            if not force:
                done = state.get("status") == "complete"
                what = "a finished run" if done else "an unfinished run"
                hint = "" if done else "--resume to continue it, "
                raise RunFolderError(f"{self.path}: holds {what}; use {hint}--force to overwrite it, "
                                     "or --out to choose another folder")
            if foreign:  # --force removes a run, never what someone else put beside it
                shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
                raise RunFolderError(f"{self.path}: holds a run and files no run wrote ({shown}); --force removes "
                                     "only what a run writes and refuses a folder shared with other files: move "
                                     "them, or choose another folder with --out")
            return 0, self.clear()
        if foreign:
            shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
            raise RunFolderError(f"{self.path}: exists and is not a compresspipe run folder (it holds {shown}); "
                                 "--force removes only what a run writes, so choose another folder with --out")
        if resume:
            raise RunFolderError(f"{self.path}: nothing to resume (no run.json); run without --resume")
        return 0, self.clear()
