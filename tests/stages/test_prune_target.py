"""prune target: {macs | params | latency_b1}: per-group amounts allocated to meet it, reported, planned, cached."""

from __future__ import annotations

import json

import pytest
import torch

from compresspipe.artifacts.model import load_model, save_model
from compresspipe.errors import StageConfigError
from compresspipe.metrics import count_macs, count_params
from compresspipe.stages.prune.stage import PruneStage
from tests.fixtures import CNN, cli, digits_cnn_recipe, stage_context, tiny_recipe, trained_cnn, write_recipe


def _context(tmp_path, target, deploy=None, stage_dir=None):
    recipe = digits_cnn_recipe()
    recipe["stages"] = [{"type": "prune", "target": target}]
    if deploy is not None:
        recipe["deploy"] = deploy
    parsed, ctx = stage_context(tmp_path, recipe, "prune", stage_dir=stage_dir or tmp_path / "stage")
    return PruneStage(parsed.stages[0]), ctx


@pytest.mark.parametrize("prune, message", [
    ({"amount": 0.5, "target": {"macs": 0.3}}, "give amount (the fraction to remove) or target"),
    ({}, "e.g. amount: 0.5 or target: {macs: 0.25}"),
    ({"target": {"macs": 0.3, "params": 0.5}}, "give exactly one target"),
    ({"target": {}}, "give exactly one target"),
    ({"target": {"macs": 1.5}}, "stages[0].target.macs: must be less than 1"),
    ({"method": "magnitude", "target": {"macs": 0.3}}, "a target needs method structured or random"),
    ({"target": {"params": 0.3}, "per_layer": {"c1": 0.2}}, "remove per_layer"),
    ({"target": {"params": 0.3}, "scope": "global"}, "use target.allocate: global"),
    ({"target": {"macs": 0.3, "ratios": [0.5, 0.3]}}, "ratios must be increasing"),
])
def test_target_is_validated_like_any_field(tmp_path, prune, message):
    path = write_recipe(tmp_path, tiny_recipe(model=CNN, stages=[{"type": "prune", **prune}]))
    result = cli("validate", path)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "recipe.yaml:" in result.output


@pytest.mark.parametrize("allocate", ["sensitivity", "global"])
def test_a_macs_target_is_met_and_the_allocation_reported(tmp_path, allocate):
    stage, ctx = _context(tmp_path, {"macs": 0.4, "allocate": allocate, "samples": 128})
    state = trained_cnn()
    base = count_macs(state.module, (1, 8, 8))
    result = stage.run(state, ctx)
    share = count_macs(result.state.module, (1, 8, 8)) / base
    assert 0.2 < share <= 0.4  # met, and not pruned far beyond what was asked
    alloc = result.details["allocation"]
    assert alloc["metric"] == "macs" and alloc["allocate"] == allocate and alloc["achieved"] == pytest.approx(share)
    assert set(alloc["amounts"]) == {"c1", "c2", "fc1"} and all(0 <= a <= 0.9 for a in alloc["amounts"].values())
    assert [r["group"] for r in result.details["tables"]["allocation"]] == list(alloc["amounts"])
    assert result.notes[0].startswith("target macs 0.4:")
    assert json.loads((tmp_path / "stage" / "pruning.json").read_text())["target"]["achieved"] == alloc["achieved"]
    # the artifact reloads to the same model (the resize edit records the allocated shapes)
    save_model(result.state, tmp_path / "saved")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "saved").module(x), result.state.module(x))
    # plan shows the allocation it would use; it comes from the cache now, so it is the same one
    plan = stage.plan(trained_cnn(), ctx)
    assert {k: plan.layers[k] for k in alloc["amounts"]} == alloc["amounts"]
    assert plan.notes[0].startswith("target macs 0.4:") and "from the cache" in plan.notes[1]


def test_a_params_target_on_a_residual_model_prunes_coupled_layers_together(tmp_path):
    recipe = tiny_recipe(model={"builtin": "tiny-resnet", "input_shape": [3, 16, 16]},
                         data={"dataset": "synthetic", "shape": [3, 16, 16], "samples": 96, "num_classes": 10},
                         stages=[{"type": "prune", "target": {"params": 0.5, "samples": 32}}])
    path = write_recipe(tmp_path, recipe)
    result = cli("run", path, "--out", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    base, pruned = report["stages"][0], report["stages"][-1]
    assert pruned["params"] / base["params"] <= 0.5
    alloc = pruned["details"]["allocation"]
    assert any(len(members) > 1 for members in alloc["members"].values())  # residual branches share a group


def test_a_latency_target_is_timed_in_the_deploy_runtime_and_cached(tmp_path):
    from compresspipe.artifacts.model import ModelState
    from compresspipe.models.factory import build_model

    recipe = tiny_recipe(model={"builtin": "digits-cnn", "input_shape": [1, 8, 8]},
                         data={"dataset": "digits", "max_samples": 300, "eval_batch_size": 64},
                         deploy={"runtime": "onnxruntime", "rounds": 3},
                         stages=[{"type": "prune", "target": {"latency_b1": 0.85, "samples": 32}}])
    parsed, ctx = stage_context(tmp_path, recipe, "prune", stage_dir=tmp_path / "stage")
    stage = PruneStage(parsed.stages[0])

    def model():  # the full-width digits-cnn: ONNX Runtime's time at batch 1 follows its channels
        torch.manual_seed(0)
        return ModelState(build_model({"builtin": "digits-cnn"}).eval(), {"builtin": "digits-cnn"}, (1, 8, 8), 10)

    first = stage.run(model(), ctx)
    alloc = first.details["allocation"]
    assert alloc["metric"] == "latency_b1" and alloc["achieved"] <= 0.85  # as timed when it was allocated
    assert not (tmp_path / "stage" / ".latency-target").exists()  # candidate files are removed
    again = stage.run(model(), ctx)  # a re-run (verify) prunes the same channels: the timing is cached
    assert again.details["allocation"]["amounts"] == alloc["amounts"]
    assert count_params(again.state.module) == count_params(first.state.module)


def test_an_unreachable_target_says_what_is_possible(tmp_path):
    stage, ctx = _context(tmp_path, {"macs": 0.001, "max_amount": 0.5, "samples": 64})
    with pytest.raises(StageConfigError, match=r"cannot be reached: removing up to max_amount 0.5 .* leaves"):
        stage.run(trained_cnn(), ctx)


def test_plan_shows_the_allocation(tmp_path):
    recipe = digits_cnn_recipe()
    recipe["stages"] = [{"type": "prune", "target": {"params": 0.5, "samples": 64}}]
    result = cli("plan", write_recipe(tmp_path, recipe), "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["stages"][1]
    assert row["notes"][0].startswith("target params 0.5:") and set(row["layers"]) >= {"c1", "c2", "fc1"}
    assert row["params"] <= 0.5 * json.loads(result.stdout)["stages"][0]["params"]


def test_a_target_on_a_model_the_graph_cannot_trace_is_a_config_error():
    """amount: prunes such a model part by part; a target's allocation needs the whole graph, and says so."""
    from types import SimpleNamespace

    import torchvision

    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.prune import PruneConfig
    from compresspipe.stages.prune.allocate import allocate
    from compresspipe.stages.prune.stage import resolve_selection

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    config = PruneConfig(type="prune", target={"macs": 0.5})
    state = ModelState(model, {}, (3, 16, 16), 10)
    with pytest.raises(StageConfigError, match="cannot build .* give amount: instead"):
        allocate(PruneStage(config), state, SimpleNamespace(name="prune"),  # type: ignore[arg-type]
                 resolve_selection(config, model, "prune"))
