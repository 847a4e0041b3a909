"""Every registered stage passes the same contract (timm tests every model, NNCF every backend)."""

import json

import pytest
import torch

from compresspipe.artifacts.model import load_model
from compresspipe.errors import RecipeError
from compresspipe.recipe import load_recipe
from compresspipe.run.executor import RunOptions, run_recipe
from compresspipe.stages import STAGES
from compresspipe.ui import UI
from tests.fixtures import tiny_recipe, write_recipe

STAGE_TYPES = STAGES.names()
STABLE = ("accuracy", "loss", "params", "nonzero_params", "bytes", "macs", "kind")


def _recipe(stage_type):
    cls = STAGES.get(stage_type)
    assert cls.example, f"{stage_type}: StageConfig.example must give a small, fast configuration"
    assert cls.example["type"] == stage_type
    model = {"builtin": "digits-cnn", "kwargs": {"width": 8, "hidden": 32}, "input_shape": [1, 8, 8]}
    return tiny_recipe(model=model, stages=[{"type": "train", "epochs": 1, "name": "warm"}, dict(cls.example)])


def _run(tmp_path, recipe, out):
    path = write_recipe(tmp_path, recipe, f"{out}.yaml")
    return run_recipe(load_recipe(path), path, RunOptions(out=tmp_path / out), UI(quiet=True))


def test_every_stage_is_listed_with_docs():
    for name in STAGE_TYPES:
        cls = STAGES.get(name)
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} config needs a one-line docstring"
        assert cls.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_stage_round_trip_and_determinism(tmp_path, stage_type):
    recipe = _recipe(stage_type)
    first = _run(tmp_path, recipe, "a")
    second = _run(tmp_path, recipe, "b")
    row_a, row_b = first.report["stages"][-1], second.report["stages"][-1]
    assert {k: row_a[k] for k in STABLE} == {k: row_b[k] for k in STABLE}
    folder = first.folder / row_a["folder"]
    original = load_model(folder)
    reloaded = load_model(folder)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original.module(x), reloaded.module(x))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["name"] == stage_type and metrics["type"] == stage_type


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_stage_rejects_unknown_keys(tmp_path, stage_type):
    recipe = _recipe(stage_type)
    recipe["stages"][-1]["no_such_option"] = 1
    with pytest.raises(RecipeError, match=r"stages\[1\]\.no_such_option: unknown key"):
        load_recipe(write_recipe(tmp_path, recipe))
