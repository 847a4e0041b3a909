import json
from pathlib import Path

from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.recipe.spec import StageConfig
from compresspipe.run.plan import recipe_warnings
from tests.fixtures import tiny_recipe, write_recipe

runner = CliRunner()


def test_plan_predicts_without_running_or_writing(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    result = runner.invoke(app, ["plan", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    base, train = plan["stages"]
    assert base["params"] == train["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert train["predicted"] is True
    assert not (tmp_path / "runs").exists()
    table = runner.invoke(app, ["plan", str(path)])
    assert table.exit_code == 0 and "nothing written" in table.output


def test_plan_on_invalid_recipe_is_exit_2(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": -1}]))
    assert runner.invoke(app, ["plan", str(path)]).exit_code == 2


def test_warnings_for_recipes_that_cannot_deliver():
    from compresspipe.recipe.loader import validate_recipe_data

    class Fake(StageConfig):
        method: str | None = None
        teacher: str | None = None

    recipe = validate_recipe_data(tiny_recipe(stages=[]))
    stages = [Fake(type="prune", name="p", method="magnitude"), Fake(type="distill", name="d", teacher="baseline"),
              Fake(type="quantize", name="q", method="dynamic"), Fake(type="factorize", name="f"),
              Fake(type="export", name="e")]
    recipe = recipe.model_copy(update={"stages": stages})
    messages = {w["stage"]: w["message"] for w in recipe_warnings(recipe)}
    assert "no speedup" in messages["p"] and "export keeps dense weights" in messages["p"]
    assert "random network" in messages["d"]
    assert "q" not in messages  # quantize before factorize is a validation error now, not a warning


def test_a_weight_changing_stage_after_quantize_is_exit_2_at_validation(tmp_path):
    stages = [{"type": "train", "epochs": 1}, {"type": "quantize", "method": "dynamic"},
              {"type": "factorize", "rank": {"ratio": 0.5}}, {"type": "export", "formats": ["onnx"]}]
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, tiny_recipe(stages=stages)))])
    assert result.exit_code == 2
    assert "stages[2].type: factorize cannot run after stages[1] (quantize, quantize)" in " ".join(result.output.split())
    stages[1]["backend"] = "onnxruntime"  # the PyTorch model stays float: factorizing it is fine
    stages[1]["method"] = "static"
    assert runner.invoke(app, ["validate", str(write_recipe(tmp_path, tiny_recipe(stages=stages)))]).exit_code == 0


def test_default_settings_raise_no_warning_and_a_tiny_calibration_does(tmp_path):
    from compresspipe.recipe import load_recipe

    quantize = {"type": "quantize", "method": "static"}
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}, quantize])))
    assert recipe_warnings(recipe) == []  # the defaults must not set off the tool's own warnings
    tiny = tiny_recipe(stages=[quantize | {"calibration": {"batches": 1}}])
    tiny["data"]["eval_batch_size"] = 32
    messages = [w["message"] for w in recipe_warnings(load_recipe(write_recipe(tmp_path, tiny)))]
    assert any("calibrates on 32 samples" in m for m in messages)


def test_plan_fits_the_terminal_and_stages_prints_pasteable_yaml(tmp_path):
    import yaml

    quickstart = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
    result = runner.invoke(app, ["plan", str(quickstart)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80 and "…" not in result.output
    listing = runner.invoke(app, ["stages"], env={"COLUMNS": "200"}).output
    assert "Int8Settings(" not in listing and "VerifySettings(" not in listing
    line = next(x for x in listing.splitlines() if x.strip().startswith("verify "))
    default = line.split("│")[1].strip()
    assert yaml.safe_load(default)["batches"] == 8  # the default reads back as YAML
