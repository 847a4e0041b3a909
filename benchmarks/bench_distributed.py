"""Training-loop throughput with --nproc 2 vs 1 process on the same machine (samples/s), and accuracy band."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

TITLE = "data-parallel training: --nproc 2 vs 1 (digits-cnn, same recipe, same machine)"


def _run(recipe: dict, nproc: int, folder: Path) -> dict:
    path = folder / f"r{nproc}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = folder / f"run{nproc}"
    cmd = [sys.executable, "-m", "compresspipe", "run", str(path), "--out", str(out), "-q", "--nproc", str(nproc)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "report.json").read_text())["stages"][-1]


def run() -> list[dict]:
    recipe = {
        "compresspipe": 1, "name": "ddp-bench", "seed": 0, "device": "cpu",
        "model": {"builtin": "digits-cnn", "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "batch_size": 64},
        "evaluate": {"latency": {"enabled": False}},
        "stages": [{"type": "train", "epochs": 12, "lr": 2.0e-3}],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: _run(recipe, n, Path(tmp)) for n in (1, 2)}
    base = results[1]["details"]["samples_per_second"]
    for n, row in results.items():
        sps = row["details"]["samples_per_second"]
        rows.append({"case": f"--nproc {n}", "samples/s": sps, "throughput ratio": sps / base,
                     "accuracy": row["accuracy"], "train seconds": row["seconds"]})
    return rows
