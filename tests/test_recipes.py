"""The example recipes are documentation that cannot rot: each validates, and the quickstart runs."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
runner = CliRunner()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages, f"{path.name} has no stages"


def test_quickstart_runs_at_reduced_budget(tmp_path):
    quick = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    result = runner.invoke(app, ["run", str(quick), "--out", str(tmp_path / "q"), "-q",
                                 "--set", "stages.0.epochs=2", "--set", "evaluate.latency.iters=2"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q" / "01-train" / "model.safetensors").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_plan_runs_on_every_recipe_without_training(path, tmp_path):
    import json
    import time

    t0 = time.perf_counter()
    result = runner.invoke(app, ["plan", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["name"] for s in plan["stages"]][0] == "baseline" and len(plan["stages"]) > 1
    assert time.perf_counter() - t0 < 30  # seconds, not a training run
    assert not (tmp_path / "runs").exists()
