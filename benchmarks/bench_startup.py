"""Start-up: `compresspipe --help`, `validate` and `schema` against `import torch`, interleaved in one run.

The recipe layer imports no torch, so the commands people run most often (and CI runs on every push) take a
fraction of torch's import time. Each round times every command once, in turn, in a fresh interpreter.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TITLE = "start-up: CLI commands vs `import torch` (fresh interpreter each, medians of interleaved rounds)"
ROOT = Path(__file__).parent.parent
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "compresspipe --help": [sys.executable, "-m", "compresspipe", "--help"],
    "compresspipe validate": [sys.executable, "-m", "compresspipe", "validate", "recipes/quickstart.yaml"],
    "compresspipe schema": [sys.executable, "-m", "compresspipe", "schema"],
}


def run(rounds: int = 7) -> list[dict[str, Any]]:
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(rounds):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    torch_s = statistics.median(times["import torch"])
    return [{"case": name, "seconds": statistics.median(t), "vs import torch": statistics.median(t) / torch_s,
             "target": "" if name == "import torch" else "<= 0.3"} for name, t in times.items()]


if __name__ == "__main__":
    for row in run():
        print(row)
