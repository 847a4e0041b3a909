"""The export acceptance matrix: every format after every compression stage, builtin and torchvision models.

About 20 minutes on 2 cores (ExecuTorch lowering of torchvision graphs dominates), so it runs with
`make acceptance` (COMPRESSPIPE_ACCEPTANCE=1), not in `make test`, which covers a fast subset of it.
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.stages.export import FORMAT_ORDER
from tests.fixtures import write_recipe

pytestmark = pytest.mark.skipif(not os.environ.get("COMPRESSPIPE_ACCEPTANCE"),
                                reason="acceptance matrix: make acceptance (about 20 minutes)")

DIGITS = {"dataset": "digits", "max_samples": 400}
MODELS = {
    "digits-mlp": ({"builtin": "digits-mlp", "input_shape": [1, 8, 8]}, DIGITS),
    "digits-cnn": ({"builtin": "digits-cnn", "input_shape": [1, 8, 8]}, DIGITS),
    "tiny-resnet": ({"builtin": "tiny-resnet", "input_shape": [3, 16, 16]},
                    {"dataset": "synthetic", "shape": [3, 16, 16], "samples": 128, "num_classes": 10}),
    "resnet18": ({"torchvision": "resnet18", "kwargs": {"num_classes": 10}, "input_shape": [3, 32, 32]},
                 {"dataset": "synthetic", "shape": [3, 32, 32], "samples": 128, "num_classes": 10}),
    "mobilenet_v2": ({"torchvision": "mobilenet_v2", "kwargs": {"num_classes": 10, "width_mult": 0.5},
                      "input_shape": [3, 32, 32]},
                     {"dataset": "synthetic", "shape": [3, 32, 32], "samples": 128, "num_classes": 10}),
}
PRUNE = {"type": "prune", "method": "structured", "amount": 0.5}
FACTORIZE = {"type": "factorize", "rank": {"ratio": 0.5}}
QUANTIZE = {"type": "quantize", "method": "static", "calibration": {"batches": 2}}
PIPELINES = {"plain": [], "prune": [PRUNE], "factorize": [FACTORIZE], "quantize": [QUANTIZE],
             "prune+factorize+quantize": [PRUNE, FACTORIZE, QUANTIZE]}


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("model", list(MODELS))
def test_every_format_exports_and_verifies(tmp_path, model, pipeline):
    spec, data = MODELS[model]
    recipe = {
        "compresspipe": 1, "name": f"{model}-{pipeline.replace('+', '-')}", "seed": 0, "device": "cpu", "model": spec,
        "data": {**data, "batch_size": 32, "eval_batch_size": 32}, "evaluate": {"latency": {"enabled": False}},
        "stages": [{"type": "train", "epochs": 1, "lr": 1.0e-3}, *PIPELINES[pipeline],
                   {"type": "export", "formats": list(FORMAT_ORDER), "verify": {"batches": 2, "min_agreement": 0.8},
                    "int8": {"calibration": {"batches": 2, "batch_size": 16}}}],
    }
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path, recipe)), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["stages"][-1]["details"]["tables"]["exports"]
    assert {r["format"] for r in rows} == set(FORMAT_ORDER)
    assert all(r["check"] == "pass" for r in rows), rows
