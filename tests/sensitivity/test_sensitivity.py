"""Sensitivity: per-layer curves of prune, quantize and factorize, cached by model hash and settings; the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compresspipe.sensitivity.measure import measure, model_hash
from compresspipe.stages.factorize.stage import FactorizeStage
from compresspipe.stages.prune.stage import PruneStage
from compresspipe.stages.quantize.stage import QuantizeStage
from tests.fixtures import CNN, cli, digits_cnn_recipe, stage_context, tiny_recipe, trained_cnn, write_recipe


def _ctx(tmp_path, stage):
    recipe = digits_cnn_recipe()
    recipe["stages"] = [stage]
    parsed, ctx = stage_context(tmp_path, recipe, "s", stage_dir=tmp_path / "stage")
    return parsed.stages[0], ctx


def test_prune_curves_are_measured_once_then_read_from_the_cache(tmp_path):
    cfg, ctx = _ctx(tmp_path, {"type": "prune", "amount": 0.5})
    stage = PruneStage(cfg)
    settings = stage.sensitivity_settings([0.25, 0.5, 0.75])
    first = measure(stage, trained_cnn(), ctx, settings, samples=100)
    assert first["samples"] == 100 and first["measured_layers"] == 3 and first["cached_layers"] == 0
    assert [r["layer"] for r in first["layers"]] == ["c1", "c2", "fc1"]  # the head's outputs are the classes
    for row in first["layers"]:
        assert [p["setting"] for p in row["points"]] == [0.25, 0.5, 0.75]
        assert all(p["drop"] == pytest.approx(first["baseline"]["accuracy"] - p["accuracy"]) for p in row["points"])
        assert row["points"][0]["params"] > row["points"][-1]["params"]  # more removed at larger ratios
    c1 = first["layers"][0]["points"]
    assert [p["channels"] for p in c1] == ["6/8", "4/8", "2/8"]
    again = measure(stage, trained_cnn(), ctx, settings, samples=100)
    assert again["cached_layers"] == 3 and again["layers"] == first["layers"]
    other = measure(stage, trained_cnn(), ctx, stage.sensitivity_settings([0.5]), samples=100)
    assert other["measured_layers"] == 3  # other settings: another cache entry
    changed = trained_cnn()
    changed.module.fc2.bias.data += 1
    assert model_hash(changed) != model_hash(trained_cnn())


def test_a_cache_entry_edited_by_hand_is_measured_again_not_trusted(tmp_path):
    cfg, ctx = _ctx(tmp_path, {"type": "prune", "amount": 0.5})
    stage = PruneStage(cfg)
    settings = stage.sensitivity_settings([0.5])
    first = measure(stage, trained_cnn(), ctx, settings, samples=100)
    path = Path(first["cache"])
    data = json.loads(path.read_text())
    data["layers"]["c1"]["points"][0]["accuracy"] = 1.0  # a hand edit: c1 now looks harmless to prune
    path.write_text(json.dumps(data))
    logged = []
    ctx.ui.log = logged.append
    again = measure(stage, trained_cnn(), ctx, settings, samples=100)
    assert again["cached_layers"] == 2 and again["measured_layers"] == 1
    assert again["layers"] == first["layers"]  # c1 measured again: the edit changed nothing
    assert any("do not match the checksum" in line and "c1" in line for line in logged), logged


def test_quantize_and_factorize_curves(tmp_path):
    cfg, ctx = _ctx(tmp_path, {"type": "quantize", "calibration": {"batches": 1}})
    stage = QuantizeStage(cfg)
    doc = measure(stage, trained_cnn(), ctx, stage.sensitivity_settings(), samples=64)
    assert [r["layer"] for r in doc["layers"]] == ["c1", "c2", "fc1", "fc2"]
    assert all(len(r["points"]) == 1 and r["points"][0]["setting"] == "int8" for r in doc["layers"])
    cfg, ctx = _ctx(tmp_path / "f", {"type": "factorize", "rank": {"ratio": 0.5}, "include": ["type:Linear"]})
    stage = FactorizeStage(cfg)
    doc = measure(stage, trained_cnn(), ctx, stage.sensitivity_settings([0.25, 0.5]), samples=64)
    fc2 = next(r for r in doc["layers"] if r["layer"] == "fc2")
    assert [p["setting"] for p in fc2["points"]] == [0.25, 0.5] and fc2["points"][0]["rank"] == 3


def test_magnitude_pruning_has_no_sensitivity(tmp_path):
    cfg, _ = _ctx(tmp_path, {"type": "prune", "method": "magnitude", "amount": 0.5})
    assert PruneStage(cfg).sensitivity_settings() is None


def test_the_command_writes_json_and_html_in_parallel_and_caches(tmp_path):
    recipe = tiny_recipe(model=CNN, data={"dataset": "digits", "max_samples": 400, "eval_batch_size": 64},
                         stages=[{"type": "train", "epochs": 1, "lr": 3e-3}, {"type": "prune", "amount": 0.5}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "sens"
    result = cli("sensitivity", path, "--out", out, "--workers", "2", "--ratios", "0.3,0.6", "--samples", "64", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["format"] == "compresspipe.sensitivity" and doc["version"] == 1 and doc["workers"] == 2
    assert doc["stage"] == "prune" and doc["measured_layers"] == 3 and doc["settings"]["ratios"] == [0.3, 0.6]
    html = (out / "sensitivity.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "<script" not in html
    assert "c2" in result.output and "0.3" in result.output  # the terminal table
    assert (out / "run" / "report.json").is_file()  # the stage before it ran as an ordinary run
    again = cli("sensitivity", path, "--out", out, "--ratios", "0.3,0.6", "--samples", "64", "--json", "-q")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["cached_layers"] == 3  # the same model and settings: nothing measured again


@pytest.mark.parametrize("stages, args, message", [
    ([{"type": "train", "epochs": 1}], [], "no prune, quantize, factorize stage to measure"),
    ([{"type": "prune", "amount": 0.5}], ["--stage", "prun"], "unknown stage 'prun'; did you mean 'prune'?"),
    ([{"type": "prune", "amount": 0.5, "method": "magnitude"}], [], "has no sensitivity to measure"),
    ([{"type": "prune", "amount": 0.5}], ["--ratios", "0.5,1.5"], "every ratio must be between 0 and 1"),
])
def test_bad_input_is_exit_2(tmp_path, stages, args, message):
    path = write_recipe(tmp_path, tiny_recipe(model=CNN, stages=stages))
    result = cli("sensitivity", path, "--out", tmp_path / "s", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_language_model_is_scored_by_its_own_metric_and_named_inputs(tmp_path):
    """Sensitivity scores with the task's metric (perplexity: lower is better, so a drop is a rise) on the model's
    named inputs (input_ids, attention_mask), not with top-1 and cross-entropy on one tensor."""
    from compresspipe.run.setup import build_baseline
    from tests.stages.test_prune_decoder import TINY_LLAMA, lm_recipe

    recipe = lm_recipe(TINY_LLAMA)
    recipe["stages"] = [{"type": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 16}]
    parsed, ctx = stage_context(tmp_path, recipe, "s", stage_dir=tmp_path / "stage")
    stage = QuantizeStage(parsed.stages[0])
    state = build_baseline(parsed, ctx.data)
    result = measure(stage, state, ctx, stage.sensitivity_settings() or {}, samples=16,
                     layers=["model.model.layers.0.mlp.down_proj", "model.lm_head"], use_cache=False)
    base = result["baseline"]["accuracy"]
    assert base > 1.0  # a perplexity, not a share of correct tokens
    for row in result["layers"]:
        point = row["points"][0]
        assert point["drop"] == pytest.approx(point["accuracy"] - base)  # worse = higher perplexity
