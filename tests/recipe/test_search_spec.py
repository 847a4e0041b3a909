"""The search: block is validated like any field: every bad input is exit 2 at its line, before anything runs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compresspipe.recipe import load_recipe
from compresspipe.recipe.search import Dimension, apply_params, parse_pick, pick_problems, used_variables
from tests.fixtures import cli, tiny_recipe, write_recipe

SEARCH_RECIPE = """\
compresspipe: 1
name: s
device: cpu
vars:
  amount: 0.5
  width: 8
model: {builtin: digits-cnn, kwargs: {width: "${vars.width}", hidden: 32}, input_shape: [1, 8, 8]}
data: {dataset: digits, max_samples: 300}
stages:
  - type: train
    epochs: 1
  - type: prune
    amount: ${vars.amount}
search:
  space:
    vars.amount: {low: 0.2, high: 0.7}
    vars.width: {choices: [4, 8]}
    stages.prune.steps: {choices: [1, 2]}
  objectives: {accuracy_drop: minimize, bytes: minimize}
"""


def _errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_a_good_search_block_validates_and_trials_are_plain_recipes(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH_RECIPE)
    assert cli("validate", path).exit_code == 0
    recipe = load_recipe(path)
    assert recipe.search is not None and recipe.search.space["vars.width"].grid() == [4, 8]
    assert recipe.search.space["vars.amount"].grid() is None  # continuous
    import yaml

    raw = yaml.safe_load(SEARCH_RECIPE)
    data = apply_params(raw, {"vars.amount": 0.3, "vars.width": 4, "stages.prune.steps": 2})
    assert "search" not in data and "vars" not in data
    assert data["stages"][1] == {"type": "prune", "amount": 0.3, "steps": 2}
    assert data["model"]["kwargs"]["width"] == 4  # a whole-value placeholder keeps the variable's type
    assert used_variables(raw) == {"amount", "width"}


@pytest.mark.parametrize("change, line, message", [
    ("    vars.amount: {low: 0.7, high: 0.2}", 16, "empty range: low 0.7 is above high 0.2"),
    ("    vars.amount: {low: 0.5, high: 0.5}", 16, "empty range: low and high are both 0.5"),
    ("    vars.amount: {choices: []}", 16, "empty choices"),
    ("    vars.amount: {choices: [0.3, high]}", 16, "choices must all be of one type (got number and string"),
    ("    vars.width: {choices: [4, wide]}", 17, "choices must all be of one type"),
    ("    vars.width: {choices: [small, wide]}", 17, "'small' is a string, but vars.width is a number (8)"),
    ("    stages.prune.steps: {choices: [1, 2.5]}", 18, "2.5 does not give a valid recipe: stages[1].steps"),
    ("    stages.prune.amount: {low: 0.2, high: 1.5}", 18, "1.5 does not give a valid recipe: stages[1].amount"),
    ("    stages.prun.steps: {choices: [1, 2]}", 18, "unknown stage 'prun'; did you mean 'prune'?"),
    ("    vars.amount: {low: 0.0, high: 0.5, log: true}", 16, "log: true needs low > 0"),
])
def test_a_bad_space_is_exit_2_at_its_line(tmp_path, change, line, message):
    lines = SEARCH_RECIPE.splitlines()
    target = {16: 15, 17: 16, 18: 17}[line]
    lines[target] = change
    errors = _errors(tmp_path, "\n".join(lines) + "\n")
    assert any(f"s.yaml:{line}:" in e and message in e for e in errors), errors


def test_a_variable_the_recipe_never_uses_and_one_never_defined(tmp_path):
    text = SEARCH_RECIPE.replace("  width: 8\n", "  width: 8\n  unused: 3\n").replace(
        "    stages.prune.steps: {choices: [1, 2]}", "    vars.unused: {choices: [1, 2]}\n    vars.nope: {low: 1, high: 3}")
    errors = _errors(tmp_path, text)
    assert any("s.yaml:19:5 search.space.vars.unused: variable 'unused' is never used in the recipe" in e
               for e in errors), errors
    assert any("s.yaml:20:5 search.space.vars.nope: variable 'nope' is not defined in vars (defined: amount, unused, "
               "width)" in e for e in errors), errors


def test_objectives_pick_grid_and_early_stop_are_checked_against_the_recipe(tmp_path):
    text = SEARCH_RECIPE.replace("{accuracy_drop: minimize, bytes: minimize}",
                                 "{accuracy_drop: minimize, latency_b3: minimize}")
    text += ("  sampler: grid\n  early_stop: {after: prune, max_accuracy_drop: 0.1}\n"
             "  pick: {minimize: byte, max_acuracy_drop: 0.01}\n")
    errors = _errors(tmp_path, text)
    joined = "\n".join(errors)
    assert "s.yaml:19:" in joined and "unknown objective 'latency_b3'; did you mean 'latency_b1'?" in joined
    assert "search.space.vars.amount: sampler grid needs a finite set of values" in joined
    assert "search.early_stop.after: 'prune' is the last stage" in joined
    assert "search.pick.minimize: unknown figure 'byte'; did you mean 'bytes'?" in joined
    assert "search.pick.max_acuracy_drop: unknown pick key" in joined and "'max_accuracy_drop'" in joined


def test_a_latency_objective_needs_latency(tmp_path):
    text = SEARCH_RECIPE.replace("data:", "evaluate: {latency: {enabled: false}}\ndata:").replace(
        "bytes: minimize", "latency_b1: minimize")
    assert any("latency_b1 needs latency measurement" in e for e in _errors(tmp_path, text))


def test_set_overrides_reach_the_search_block_and_are_named_in_errors(tmp_path):
    path = write_recipe(tmp_path, SEARCH_RECIPE, "s.yaml")
    result = cli("validate", path, "--set", "search.space.vars.amount.log=maybe")  # a key that holds a dot
    assert result.exit_code == 2 and "--set search.space.vars.amount.log=maybe" in result.output, result.output
    result = cli("validate", path, "--set", "search.space.vars.amount.high=0.1")
    assert result.exit_code == 2 and "s.yaml:16:18 search.space.vars.amount: empty range: low 0.2 is above high 0.1" \
        in result.output, result.output


def test_pick_text_parses_and_is_checked():
    rule = parse_pick("minimize=latency_b1,max_accuracy_drop=0.005")
    assert rule == {"minimize": "latency_b1", "max_accuracy_drop": 0.005}
    names = ["accuracy", "accuracy_drop", "bytes", "latency_b1", "speedup_b1"]
    assert pick_problems(rule, names) == []
    assert pick_problems({"min_speedup": 2, "maximize": "accuracy"}, names) == []  # as in gates: the first batch
    assert [loc for loc, _ in pick_problems({"minimize": "bytes", "maximize": "accuracy"}, names)] == [()]
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_pick("minimize")


def test_dimension_grids():
    assert Dimension(low=1, high=7, step=2).grid() == [1, 3, 5, 7]
    assert Dimension(low=0.4, high=0.8, step=0.1).grid() == [0.4, 0.5, 0.6, 0.7, 0.8]
    assert Dimension(low=1, high=3).integer and not Dimension(low=1.0, high=3).integer


def test_search_and_validate_import_no_torch_or_optuna(tmp_path):
    path = write_recipe(tmp_path, SEARCH_RECIPE, "s.yaml")
    code = ("import sys; from compresspipe.cli import main; sys.argv=['compresspipe','validate',sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n"
            "    assert 'torch' not in sys.modules and 'optuna' not in sys.modules, 'heavy import'; raise")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]


def test_schema_has_the_search_block():
    result = cli("schema")
    schema = json.loads(result.output)
    assert "search" in schema["properties"]


def test_run_ignores_the_search_block_and_says_so(tmp_path):
    recipe = copy.deepcopy(tiny_recipe())
    recipe["vars"] = {"epochs": 1}
    recipe["stages"] = [{"type": "train", "epochs": "${vars.epochs}"}]
    recipe["search"] = {"space": {"vars.epochs": {"choices": [1, 2]}}, "objectives": {"accuracy": "maximize"}}
    path = write_recipe(tmp_path, recipe)
    result = cli("run", path, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "compresspipe search` runs the search" in result.output
