import pytest

from compresspipe.errors import RecipeError
from compresspipe.recipe import load_recipe
from tests.fixtures import tiny_recipe, write_recipe


def _base(tmp_path, **changes):
    base = tiny_recipe(
        vars={"epochs": 2, "width": 16},
        stages=[{"type": "train", "epochs": "${vars.epochs}", "lr": 1.0e-3},
                {"type": "train", "name": "tune", "epochs": 1, "lr": 1.0e-4}],
        **changes,
    )
    base["model"]["kwargs"] = {"hidden": "${vars.width}"}
    return write_recipe(tmp_path, base, "base.yaml")


def test_extends_merges_deeply_and_matches_stages_by_name(tmp_path):
    _base(tmp_path)
    child = {"extends": "base.yaml", "name": "child",
             "stages": [{"name": "tune", "lr": 5.0e-5}, {"type": "train", "name": "extra", "epochs": 1}]}
    recipe = load_recipe(write_recipe(tmp_path, child, "child.yaml"))
    assert recipe.name == "child" and recipe.data.dataset == "digits"
    assert recipe.stage_names() == ["train", "tune", "extra"]
    assert recipe.stages[1].lr == 5.0e-5 and recipe.stages[1].epochs == 1  # merged, not replaced
    assert recipe.stages[0].epochs == 2 and recipe.model.kwargs == {"hidden": 16}  # vars keep their type


def test_documented_order_extends_then_set_then_vars(tmp_path):
    _base(tmp_path)
    child = write_recipe(tmp_path, {"extends": "base.yaml", "vars": {"epochs": 5}}, "child.yaml")
    assert load_recipe(child).stages[0].epochs == 5  # child vars win over base vars
    assert load_recipe(child, ["vars.epochs=7"]).stages[0].epochs == 7  # --set on a var
    assert load_recipe(child, ["stages.0.epochs=9"]).stages[0].epochs == 9  # --set on the value itself


def test_vars_substitute_inside_strings_without_evaluating(tmp_path):
    data = tiny_recipe(vars={"tag": "v1", "expr": "__import__('os')"}, name="run-${vars.tag}")
    data["stages"][0]["name"] = "${vars.expr}"
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, data))
    assert exc.value.problems[0].path == "stages[0].name"  # the text is substituted, not run
    data["stages"][0]["name"] = "t"
    assert load_recipe(write_recipe(tmp_path, data)).name == "run-v1"


def test_undefined_variable_and_unknown_placeholder(tmp_path):
    data = tiny_recipe(vars={"a": 1})
    data["stages"][0]["epochs"] = "${vars.b}"
    data["stages"][0]["lr"] = "${env.HOME}"
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, data))
    msgs = {p.path: p.message for p in exc.value.problems}
    assert "undefined variable 'b'; defined in vars: a" in msgs["stages[0].epochs"]
    assert "only ${vars.NAME}" in msgs["stages[0].lr"]


def test_extends_cycle_and_missing_base_name_the_chain(tmp_path):
    write_recipe(tmp_path, {"extends": "b.yaml", "name": "a"}, "a.yaml")
    write_recipe(tmp_path, {"extends": "a.yaml", "name": "b"}, "b.yaml")
    with pytest.raises(RecipeError, match=r"extends cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")
    write_recipe(tmp_path, {"extends": "nowhere.yaml"}, "c.yaml")
    with pytest.raises(RecipeError, match="base recipe not found"):
        load_recipe(tmp_path / "c.yaml")


def test_errors_point_into_the_file_that_holds_the_value(tmp_path):
    _base(tmp_path, seed=-3)
    child = write_recipe(tmp_path, {"extends": "base.yaml", "stages": [{"name": "tune", "lr": -1}]}, "child.yaml")
    with pytest.raises(RecipeError) as exc:
        load_recipe(child)
    where = {p.path: p.file for p in exc.value.problems}
    assert where["seed"].endswith("base.yaml")
    assert where["stages[1].lr"].endswith("child.yaml")


def test_base_paths_are_relative_to_the_base_file(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "w.safetensors").write_bytes(b"")
    base = tiny_recipe()
    base["model"]["checkpoint"] = "w.safetensors"
    write_recipe(shared, base, "base.yaml")
    team = tmp_path / "team"
    team.mkdir()
    recipe = load_recipe(write_recipe(team, {"extends": "../shared/base.yaml", "name": "t"}))
    assert recipe.model.checkpoint == str((shared / "w.safetensors").resolve())
