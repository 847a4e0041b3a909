"""Every stage on every kind of model a user brings: a timm CNN, a timm ViT, a Hugging Face BERT-style text
classifier, a Hugging Face ViT and a local nn.Module (python: source). Each combination runs, or ends with exit
2/3 and a message naming what is unsupported; a finished stage's artifact reloads to the same outputs.

Runs with `make acceptance` (COMPRESSPIPE_ACCEPTANCE=1); `make test` runs the FAST subset.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from compresspipe.artifacts.model import load_model
from compresspipe.metrics import count_params
from compresspipe.models.code import allowing_code
from compresspipe.models.inputs import example, forward
from tests.fixtures import TINY_BERT, TINY_VIT_HF, TINY_VIT_TIMM, USER_CNN, cli, write_recipe

pytest.importorskip("timm")
pytest.importorskip("transformers")

IMAGES = {"dataset": "synthetic", "shape": [3, 16, 16], "samples": 160, "num_classes": 10}
TEXT = {"dataset": "synthetic-text", "vocab_size": 64, "seq_len": 16, "samples": 160, "num_classes": 2}
MODELS = {
    "timm-cnn": ({"timm": "resnet10t", "kwargs": {"num_classes": 10}, "input_shape": [3, 16, 16]}, IMAGES,
                 "classification"),
    "timm-vit": ({**TINY_VIT_TIMM, "input_shape": [3, 16, 16]}, IMAGES, "classification"),
    "hf-bert": ({"huggingface": {"config": TINY_BERT}}, TEXT, "sequence_classification"),
    "hf-vit": ({"huggingface": {"config": {**TINY_VIT_HF, "num_channels": 3}}, "input_shape": [3, 16, 16]}, IMAGES,
               "classification"),
    "local": ({"python": "net.py:build", "kwargs": {"channels": 3}, "input_shape": [3, 16, 16]}, IMAGES,
              "classification"),
}
STAGES = {
    "prune": {"type": "prune", "method": "structured", "amount": 0.5},
    "prune-magnitude": {"type": "prune", "method": "magnitude", "amount": 0.5},
    "distill": {"type": "distill", "epochs": 1},
    "factorize": {"type": "factorize", "rank": {"ratio": 0.5}, "min_saving": 0.0},
    "quantize-dynamic": {"type": "quantize", "method": "dynamic"},
    "quantize-static": {"type": "quantize", "method": "static", "calibration": {"batches": 2}},
    "quantize-weight-only": {"type": "quantize", "method": "weight_only"},
    "fold_bn": {"type": "fold_bn"},
    "export": {"type": "export", "formats": ["onnx", "onnx_int8"], "verify": {"batches": 1, "min_agreement": 0.8}},
}
# what does not run, and the words its exit-2/3 message must contain
NO_BN = "no Conv2d layer to work on|no convolution followed by a BatchNorm"
UNSUPPORTED = {("timm-vit", "fold_bn"): NO_BN, ("hf-bert", "fold_bn"): NO_BN, ("hf-vit", "fold_bn"): NO_BN}
# `make test` runs these; the rest with `make acceptance`
FAST = {("hf-bert", "prune"), ("timm-vit", "prune"), ("local", "quantize-static"), ("hf-vit", "factorize")}


def _cases():
    for model in MODELS:
        for stage in STAGES:
            marks = [] if (model, stage) in FAST or os.environ.get("COMPRESSPIPE_ACCEPTANCE") else [
                pytest.mark.skip(reason="model x stage matrix: make acceptance")]
            yield pytest.param(model, stage, marks=marks, id=f"{model}-{stage}")


@pytest.mark.parametrize(("model", "stage"), list(_cases()))
def test_every_stage_on_every_kind_of_model(tmp_path, model, stage):
    spec, data, task = MODELS[model]
    (tmp_path / "net.py").write_text(USER_CNN)
    recipe = {
        "compresspipe": 1, "name": f"{model}-{stage}", "seed": 0, "device": "cpu", "task": task, "model": spec,
        "data": {**data, "batch_size": 32, "eval_batch_size": 32}, "evaluate": {"latency": {"enabled": False}},
        "deploy": {"runtime": "onnxruntime"},
        "stages": [{"type": "train", "epochs": 4, "lr": 3.0e-3}, STAGES[stage]],
    }
    out = tmp_path / "run"
    result = cli("run", write_recipe(tmp_path, recipe), "--out", out, "-q", "--allow-code")
    want = UNSUPPORTED.get((model, stage))
    if want is not None:
        assert result.exit_code in (2, 3), result.output
        assert re.search(want, result.output) and "Traceback" not in result.output
        return
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    last = report["stages"][-1]
    assert last["accuracy"] is not None and last["files"], last
    with allowing_code():
        state = load_model(out / last["folder"])
    assert count_params(state.module) == last["params"]
    x = example(state.spec, 2, seed=3)
    with torch.no_grad():
        again = forward(load_model(out / last["folder"], allow_code=True).module, x)
        assert torch.equal(forward(state.module, x), again)
    if stage == "prune":
        assert last["params"] < report["stages"][1]["params"]
