"""One plain recipe over six torchvision classifiers (issue: defaults that work on common architectures).

prune (structured 0.3) -> factorize Linear -> static int8 -> export onnx + onnx_int8 on synthetic 3x64x64 data.
All six at that size run with `make acceptance`; `make test` runs squeezenet (a Conv2d classifier, which used
to fail by default) at 32x32. shufflenet's channel shuffle (pruned part by part) is covered in make test by
tests/stages/test_prune.py; its whole run (ONNX export of every row) takes over a minute, so it is here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.fixtures import cli, write_recipe

ACCEPTANCE = bool(os.environ.get("COMPRESSPIPE_ACCEPTANCE"))
SIX = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1", "shufflenet_v2_x0_5"]
FAST = ["squeezenet1_1"]


def six_recipe(arch: str, size: int, samples: int, epochs: int) -> dict[str, Any]:
    return {
        "compresspipe": 1, "name": f"six-{arch}", "seed": 0, "device": "cpu",
        "model": {"torchvision": arch, "kwargs": {"num_classes": 10}, "input_shape": [3, size, size]},
        "data": {"dataset": "synthetic", "samples": samples, "num_classes": 10, "batch_size": 32,
                 "eval_batch_size": 32},  # no shape: it follows the model's input_shape
        "evaluate": {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 2, "threads": 1}},
        "deploy": {"runtime": "onnxruntime", "rounds": 3},
        "stages": [
            {"type": "train", "epochs": epochs, "lr": 1.0e-3},
            {"type": "prune", "method": "structured", "amount": 0.3},
            {"type": "factorize", "include": ["type:Linear"], "rank": {"ratio": 0.5}},
            {"type": "quantize", "method": "static", "calibration": {"batches": 2}},
            {"type": "export", "formats": ["onnx", "onnx_int8"], "verify": {"batches": 2}},
        ],
    }


def _run(tmp_path, arch: str, **budget: Any) -> tuple[Any, dict[str, Any]]:
    out = tmp_path / arch
    result = cli("run", write_recipe(tmp_path, six_recipe(arch, **budget), f"{arch}.yaml"), "--out", out, "-q")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return result, report


def _check_clean(result: Any, report: dict[str, Any]) -> None:
    assert result.exit_code == 0, result.output
    assert report["status"] == "complete"
    last = report["stages"][-1]
    assert last["format"] == "onnx_int8" and last["bytes"] < report["stages"][0]["bytes"] / 3
    rows = last["details"]["tables"]["exports"]
    assert {r["format"] for r in rows} == {"onnx", "onnx_int8"} and all(r["check"] == "pass" for r in rows), rows


@pytest.mark.parametrize("arch", FAST)
def test_architectures_that_failed_by_default_run_clean(tmp_path, arch):
    _check_clean(*_run(tmp_path, arch, size=32, samples=64, epochs=1))


@pytest.mark.skipif(not ACCEPTANCE, reason="six torchvision models at 64x64: make acceptance (about 10 minutes)")
def test_six_architectures_at_least_five_clean_and_any_failure_says_what_to_change(tmp_path):
    failures = {}
    for arch in SIX:
        result, report = _run(tmp_path, arch, size=64, samples=256, epochs=2)
        if result.exit_code != 0:
            failures[arch] = result.output
            assert result.exit_code in (1, 2, 3) and "Traceback" not in result.output
            assert "error:" in result.output or "gate" in result.output
        else:
            _check_clean(result, report)
    assert len(failures) <= 1, failures
