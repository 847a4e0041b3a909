import subprocess
import sys

import pytest

from compresspipe.errors import RecipeError
from compresspipe.recipe import load_recipe
from compresspipe.recipe.schema import recipe_schema
from tests.fixtures import tiny_recipe, write_recipe

THREE_MISTAKES = """\
compresspipe: 1
name: three
model:
  builtin: digits-cn
data:
  dataset: digits
  val_fractoin: 0.2
stages:
  - type: train
    optimizer: adamm
"""


def test_every_problem_is_reported_with_line_column_and_path(tmp_path):
    path = write_recipe(tmp_path, THREE_MISTAKES)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    got = [(p.line, p.column, p.path) for p in exc.value.problems]
    assert got == [(4, 12, "model.builtin"), (7, 3, "data.val_fractoin"), (10, 16, "stages[0].optimizer")]
    text = str(exc.value)
    assert "did you mean 'digits-cnn'?" in text
    assert "did you mean 'val_fraction'?" in text
    assert "must be one of: sgd, adam, adamw (got 'adamm')" in text
    assert f"{path}:4:12 model.builtin" in text


def test_unknown_stage_suggests_and_lists_known(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "trian"}])
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, recipe))
    msg = str(exc.value)
    assert "stages[0].type: unknown stage 'trian'; did you mean 'train'? known:" in msg


def test_defaults_and_unique_stage_names(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "train"}, {"type": "train", "name": "train-2"}, {"type": "train"}])
    loaded = load_recipe(write_recipe(tmp_path, recipe))
    assert loaded.stage_names() == ["train", "train-2", "train-3"]
    assert loaded.stages[0].epochs == 10 and loaded.data.batch_size == 64


def test_duplicate_and_reserved_stage_names(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "train", "name": "a"}, {"type": "train", "name": "a"},
                                 {"type": "train", "name": "baseline"}])
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, recipe))
    paths = [p.path for p in exc.value.problems]
    assert paths == ["stages[1].name", "stages[2].name"]


def test_version_is_required_and_checked(tmp_path):
    data = tiny_recipe()
    del data["compresspipe"]
    with pytest.raises(RecipeError, match="required key 'compresspipe' is missing"):
        load_recipe(write_recipe(tmp_path, data))
    with pytest.raises(RecipeError, match="unsupported recipe format version 2"):
        load_recipe(write_recipe(tmp_path, tiny_recipe(compresspipe=2)))


def test_paths_are_relative_to_the_recipe_and_must_exist(tmp_path):
    sub = tmp_path / "team"
    sub.mkdir()
    (sub / "w.safetensors").write_bytes(b"")
    model = {"builtin": "digits-mlp", "checkpoint": "w.safetensors"}
    loaded = load_recipe(write_recipe(sub, tiny_recipe(model=model)))
    assert loaded.model.checkpoint == str(sub / "w.safetensors")
    model["checkpoint"] = "missing.safetensors"
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(sub, tiny_recipe(model=model)))
    assert exc.value.problems[0].path == "model.checkpoint"
    assert "file not found" in exc.value.problems[0].message


def test_model_source_rules(tmp_path):
    with pytest.raises(RecipeError, match="exactly one model source"):
        load_recipe(write_recipe(tmp_path, tiny_recipe(model={"builtin": "digits-mlp", "torchvision": "resnet18"})))
    with pytest.raises(RecipeError, match="runs offline"):
        load_recipe(write_recipe(tmp_path, tiny_recipe(model={"torchvision": "resnet18", "weights": "DEFAULT"})))
    with pytest.raises(RecipeError, match="did you mean 'resnet18'"):
        load_recipe(write_recipe(tmp_path, tiny_recipe(model={"torchvision": "resnet81"})))
    ok = load_recipe(write_recipe(tmp_path, tiny_recipe(model={"torchvision": "resnet18", "weights": "none"})))
    assert ok.model.torchvision == "resnet18" and ok.model.weights is None


def test_unknown_dataset_and_non_mapping_values(tmp_path):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, tiny_recipe(data={"dataset": "digitz"}, stages="train")))
    msgs = [(p.path, p.message) for p in exc.value.problems]
    assert msgs[0][0] == "data.dataset" and "did you mean 'digits'" in msgs[0][1]
    assert msgs[1] == ("stages", "must be a list of stages (got str)")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="mapping of keys at top level"):
        load_recipe(write_recipe(tmp_path, "- just\n- a list\n"))


def test_overrides_apply_and_are_validated(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    loaded = load_recipe(path, ["stages.0.epochs=7", "data.batch_size=16", "evaluate.latency.batch_sizes=[1, 2]"])
    assert loaded.stages[0].epochs == 7 and loaded.data.batch_size == 16
    assert loaded.evaluate.latency.batch_sizes == [1, 2]
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["stages.0.epochs=-1"])
    (p,) = exc.value.problems
    assert p.file == "--set stages.0.epochs=-1" and p.path == "stages[0].epochs"
    with pytest.raises(RecipeError, match="no list item 5"):
        load_recipe(path, ["stages.5.epochs=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["stages.0.epochs"])


def test_schema_has_every_stage_and_dataset():
    schema = recipe_schema()
    text = str(schema)
    for name in ("train", "digits", "synthetic", "imagefolder", "tensors"):
        assert f"'{name}'" in text
    assert schema["title"] == "compresspipe recipe"


def test_recipe_layer_does_not_import_torch(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    code = (
        "import sys; from compresspipe.recipe import load_recipe; from compresspipe.recipe.schema import recipe_schema;"
        f"load_recipe({str(path)!r}); recipe_schema(); import compresspipe.cli;"
        "assert 'torch' not in sys.modules, 'torch imported'; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
