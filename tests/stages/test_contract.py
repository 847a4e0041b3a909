"""Every registered stage passes the same contract (timm tests every model, NNCF every backend)."""

import json

import pytest
import torch

from compresspipe.artifacts.model import load_model, save_model
from compresspipe.errors import RecipeError
from compresspipe.metrics import count_macs, count_params, evaluate
from compresspipe.recipe import load_recipe
from compresspipe.run.setup import stage_implementation
from compresspipe.stages import STAGES
from compresspipe.stages.context import StageRecord
from tests.fixtures import CNN, run, stage_context, tiny_recipe, write_recipe

STAGE_TYPES = STAGES.names()
STABLE = ("accuracy", "loss", "params", "nonzero_params", "bytes", "macs", "kind")


def _recipe(stage_type):
    cls = STAGES.get(stage_type)
    assert cls.example, f"{stage_type}: StageConfig.example must give a small, fast configuration"
    assert cls.example["type"] == stage_type
    return tiny_recipe(model=CNN, stages=[{"type": "train", "epochs": 1, "name": "warm"}, dict(cls.example)])


_run = run


def test_every_stage_is_listed_with_docs():
    for name in STAGE_TYPES:
        cls = STAGES.get(name)
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} config needs a one-line docstring"
        assert cls.model_config.get("extra") == "forbid"


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The small CNN after one epoch of training: the model every stage kind is handed."""
    folder = tmp_path_factory.mktemp("warm")
    result = run(folder, tiny_recipe(model=CNN, stages=[{"type": "train", "epochs": 1, "name": "warm"}]))
    return {row["name"]: StageRecord(row["index"], row["name"], row["type"], result.folder / row["folder"], {})
            for row in result.report["stages"]}


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_the_saved_artifact_is_the_stage_result(tmp_path, warm, stage_type):
    """Reloading a stage's folder gives back the model the stage returned: same outputs, same metrics."""
    recipe, ctx = stage_context(tmp_path, _recipe(stage_type), stage_type, index=2, history=dict(warm),
                                stage_dir=tmp_path / "stage")
    (tmp_path / "stage").mkdir()
    config = recipe.stages[-1]
    result = stage_implementation(config)(config).run(load_model(warm["warm"].folder), ctx)
    save_model(result.state, tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    x = torch.stack([ctx.data.val[i][0] for i in range(32)])
    in_memory = result.state.module.eval()
    with torch.no_grad():
        assert torch.equal(in_memory(x), reloaded.module(x)), f"{stage_type}: the reloaded model computes otherwise"
    val = ctx.data.loader("val", 64)
    assert evaluate(in_memory, val, "cpu") == evaluate(reloaded.module, val, "cpu")
    assert count_params(in_memory) == count_params(reloaded.module)
    assert count_macs(in_memory, (1, 8, 8)) == count_macs(reloaded.module, (1, 8, 8))
    assert reloaded.records == result.state.records and reloaded.edits == result.state.edits


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_stage_is_deterministic(tmp_path, stage_type):
    recipe = _recipe(stage_type)
    first = _run(tmp_path, recipe, "a")
    second = _run(tmp_path, recipe, "b")
    row_a, row_b = first.report["stages"][-1], second.report["stages"][-1]
    assert {k: row_a[k] for k in STABLE} == {k: row_b[k] for k in STABLE}
    metrics = json.loads((first.folder / row_a["folder"] / "metrics.json").read_text())
    assert metrics["name"] == stage_type and metrics["type"] == stage_type


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_stage_rejects_unknown_keys(tmp_path, stage_type):
    recipe = _recipe(stage_type)
    recipe["stages"][-1]["no_such_option"] = 1
    with pytest.raises(RecipeError, match=r"stages\[1\]\.no_such_option: unknown key"):
        load_recipe(write_recipe(tmp_path, recipe))
