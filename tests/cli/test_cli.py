import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compresspipe.cli import app
from tests.fixtures import tiny_recipe, write_recipe

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_validate_ok_and_three_mistakes(tmp_path):
    good = write_recipe(tmp_path, tiny_recipe(), "good.yaml")
    result = invoke("validate", good)
    assert result.exit_code == 0 and "ok:" in result.output and "train" in result.output
    bad = tiny_recipe(seed=-1, stages=[{"type": "train", "epochs": "many", "lr": 0}])
    bad_path = write_recipe(tmp_path, bad, "bad.yaml")
    result = invoke("validate", good, bad_path)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, result.output
    assert all("bad.yaml:" in e for e in errors)
    assert "Traceback" not in result.output


def test_validate_in_fresh_interpreter_imports_no_torch_and_exits_2(tmp_path):
    bad = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "trian"}]))
    code = (f"import sys; from compresspipe.cli import main; sys.argv=['compresspipe','validate',{str(bad)!r}];\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert 'torch' not in sys.modules; raise")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "did you mean 'train'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["--help"], ["schema"], ["stages"], ["validate", "recipes/quickstart.yaml"]])
def test_start_up_commands_import_no_torch(args):
    code = ("import sys; from compresspipe.cli import main; sys.argv=['compresspipe', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert 'torch' not in sys.modules, 'torch imported'; raise")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]


def test_validate_print_shows_resolved_recipe(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    result = invoke("validate", path, "--print", "--set", "stages.0.epochs=9")
    assert result.exit_code == 0
    assert "epochs: 9" in result.output and "optimizer: adam" in result.output


def test_missing_recipe_file_is_exit_2(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_run_prints_table_and_exit_codes(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    result = invoke("run", path, "--out", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "train" in result.output and "latency b1" in result.output
    again = invoke("run", path, "--out", tmp_path / "r")
    assert again.exit_code == 2 and "--force" in again.output
    bad_set = invoke("run", path, "--out", tmp_path / "r2", "--set", "data.val_fraction=1.5")
    assert bad_set.exit_code == 2 and "--set data.val_fraction=1.5" in bad_set.output
    assert not (tmp_path / "r2").exists()  # nothing written for an invalid recipe


def test_input_error_is_exit_2(tmp_path):
    recipe = tiny_recipe(model={"builtin": "digits-mlp", "kwargs": {"wings": 2}})
    result = invoke("run", write_recipe(tmp_path, recipe), "--out", tmp_path / "r")
    assert result.exit_code == 2 and "wings" in result.output


def test_schema_stages_and_init(tmp_path):
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "stages" in schema["properties"]
    result = invoke("stages")
    assert result.exit_code == 0 and "train" in result.output and "label_smoothing" in result.output
    target = tmp_path / "new.yaml"
    assert invoke("init", target).exit_code == 0
    assert invoke("validate", target).exit_code == 0
    assert invoke("init", target).exit_code == 2  # no silent overwrite


def test_help_and_version():
    assert invoke("--help").exit_code == 0
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("compresspipe ")


def test_json_outputs_are_one_document(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    bad = write_recipe(tmp_path, tiny_recipe(seed=-1), "bad.yaml")
    result = runner.invoke(app, ["validate", str(path), str(bad), "--json"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and [r["ok"] for r in doc["recipes"]] == [True, False]
    assert doc["recipes"][1]["problems"][0]["path"] == "seed"
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r"), "--json", "-q"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["format"] == "compresspipe.report" and len(report["stages"]) == 2


def test_a_refused_rerun_prints_only_the_refusal_not_the_old_table(tmp_path):
    from tests.fixtures import cli

    recipe = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    assert cli("run", recipe, "--out", tmp_path / "r", "-q").exit_code == 0
    again = cli("run", recipe, "--out", tmp_path / "r")
    assert again.exit_code == 2 and "holds a finished run" in again.output
    assert "(complete)" not in again.output and "run folder:" not in again.output, again.output
