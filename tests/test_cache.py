"""Scratch folders: a process killed with SIGKILL leaves its own; the next process removes them, never a live one's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from compresspipe.cache import scratch_dir, sweep_scratch

pytestmark = pytest.mark.skipif(os.name != "posix", reason="pids are asked for with os.kill(pid, 0) on POSIX only")


def _dead_pid() -> int:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as child:
        child.wait()
    return child.pid


def _folder(kind: str, pid: int, age_s: float) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"compresspipe-{kind}-{pid}-"))
    (path / "model.onnx").write_bytes(b"x" * 100)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_killed_process_s_scratch_folder_is_removed_and_no_live_one(tmp_path):
    kind = f"test{os.getpid()}"
    dead_old = _folder(kind, _dead_pid(), age_s=3600)
    dead_recent = _folder(kind, _dead_pid(), age_s=0)  # a process of another container may still write to it
    live_old = _folder(kind, os.getppid(), age_s=3600)
    other_kind = _folder(f"{kind}x", _dead_pid(), age_s=3600)
    try:
        assert sweep_scratch(kind) == [dead_old]
        assert not dead_old.exists() and dead_recent.exists() and live_old.exists() and other_kind.exists()
        made = scratch_dir(kind)  # sweeps too, and names itself after this process
        assert made.name.startswith(f"compresspipe-{kind}-{os.getpid()}-") and made.is_dir()
        assert sweep_scratch(kind, older_than_s=0) == [dead_recent]
        assert made.exists() and live_old.exists()  # this process's own, and a live process's
    finally:
        for path in (dead_recent, live_old, other_kind, locals().get("made")):
            if path is not None:
                subprocess.run(["rm", "-rf", str(path)], check=False)


def test_the_onnx_copies_of_a_process_killed_with_sigkill_go_with_the_next_process(tmp_path):
    """The real case: a process that cached an exported file is killed (no atexit); the next one removes its folder."""
    code = ("import torch, sys\n"
            "from compresspipe.runtimes import onnx_cache\n"
            "f = __import__('pathlib').Path(sys.argv[1]); f.write_bytes(b'onnx')\n"
            "onnx_cache.store('k', [f], [], {})\n"
            "print(onnx_cache._folder, flush=True)\n"
            "import time; time.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "m.onnx")], stdout=subprocess.PIPE,
                          text=True) as child:
        assert child.stdout is not None
        folder = Path(child.stdout.readline().strip())
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert folder.is_dir() and folder.name.startswith(f"compresspipe-onnx-{child.pid}-")
    then = time.time() - 3600
    os.utime(folder, (then, then))
    assert folder in sweep_scratch("onnx")
    assert not folder.exists()
