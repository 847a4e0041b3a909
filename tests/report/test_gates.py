import json
import xml.etree.ElementTree as ET

from typer.testing import CliRunner

from compresspipe.cli import app
from tests.fixtures import tiny_recipe, write_recipe

runner = CliRunner()


def _run(tmp_path, recipe, out):
    path = write_recipe(tmp_path, recipe, f"{out}.yaml")
    junit = tmp_path / f"{out}.xml"
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / out), "-q", "--junit", str(junit)],
                           catch_exceptions=False)
    return result, junit


def test_met_gate_exits_0_and_impossible_gate_exits_1_keeping_everything(tmp_path):
    stages = [{"type": "train", "epochs": 2, "lr": 3.0e-3, "expect": {"min_accuracy": 0.2}},
              {"type": "train", "epochs": 1, "name": "tune"}]
    ok, junit = _run(tmp_path, tiny_recipe(stages=stages, gates={"max_accuracy_drop": 0.5}), "ok")
    assert ok.exit_code == 0, ok.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"

    gates = {"min_size_reduction": 8, "min_speedup": 2.0, "latency_batch_size": 1}
    bad, junit = _run(tmp_path, tiny_recipe(stages=stages, gates=gates), "bad")
    assert bad.exit_code == 1
    assert "min_size_reduction" in bad.output and "every artifact was written" in bad.output
    folder = tmp_path / "bad"
    for name in ("00-baseline", "01-train", "02-tune"):
        assert (folder / name / "model.safetensors").exists()
    report = json.loads((folder / "report.json").read_text())
    assert report["gates_passed"] is False
    failed = {g["gate"]: g for g in report["gates"] if not g["passed"]}
    assert set(failed) == {"min_size_reduction", "min_speedup@b1"}
    assert failed["min_size_reduction"]["value"] == 1.0 and failed["min_size_reduction"]["limit"] == 8
    cases = ET.parse(junit).getroot().findall("./testsuite/testcase")
    failing = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failing == ["min_size_reduction", "min_speedup@b1"]
    assert "FAIL" in (folder / "report.md").read_text()


def test_gate_configuration_errors_are_exit_2(tmp_path):
    recipe = tiny_recipe(gates={"min_speedup": 2, "latency_batch_size": 32, "stage": "nope", "min_fun": 1})
    path = write_recipe(tmp_path, recipe)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "gates.min_fun: unknown key" in result.output
