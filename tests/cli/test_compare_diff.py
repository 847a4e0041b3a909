import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.report.build import build_report
from compresspipe.report.html import render_html
from tests.fixtures import tiny_recipe, write_recipe

runner = CliRunner()


def _row(index, name, acc, params, bytes_, lat):
    return {"index": index, "name": name, "type": name, "kind": "weights", "folder": f"{index:02d}-{name}",
            "accuracy": acc, "loss": 0.1, "params": params, "nonzero_params": params, "sparsity": 0.0,
            "bytes": bytes_, "macs": 2 * params, "latency_ms": lat, "seconds": 1.0, "notes": []}


def _write_run(folder, recipe, rows):
    folder.mkdir()
    report = build_report(recipe, rows, rows[min(1, len(rows) - 1)]["name"], "complete")
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(tmp_path / "a", "before", [
        _row(0, "baseline", 0.10, 1000, 4000, {"1": 0.20, "8": 0.80}),
        _row(1, "train", 0.95, 1000, 4000, {"1": 0.20, "8": 0.80}),
        _row(2, "quantize", 0.94, 1000, 1500, {"1": 0.10, "8": 0.50}),
    ])
    b = _write_run(tmp_path / "b", "after", [
        _row(0, "baseline", 0.10, 1000, 4000, {"1": 0.25, "8": 0.80}),
        _row(1, "train", 0.96, 1000, 4000, {"1": 0.20, "8": 0.80}),
        _row(2, "prune", 0.93, 600, 2400, {"1": 0.15, "8": 0.60}),
        _row(3, "quantize", 0.92, 600, 900, {"1": 0.05, "8": 0.30}),
    ])
    return a, b


def test_compare_json_matches_stages_by_name_with_deltas(two_runs):
    a, b = two_runs
    out = runner.invoke(app, ["compare", str(a), str(b), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["format"] == "compresspipe.compare" and doc["batch_sizes"] == ["1", "8"]
    assert [(s["name"], s["in"]) for s in doc["stages"]] == [
        ("baseline", "both"), ("train", "both"), ("prune", "b"), ("quantize", "both")]
    quant = doc["stages"][3]["delta"]
    assert quant["accuracy"] == pytest.approx(-0.02) and quant["params"] == -400 and quant["bytes"] == -600
    assert quant["macs"] == -800 and quant["latency_ms"]["1"] == pytest.approx(-0.05)
    assert doc["stages"][0]["delta"]["latency_ms"]["1"] == pytest.approx(0.05)
    prune = doc["stages"][2]
    assert prune["a"] is None and prune["delta"] is None and prune["b"]["bytes"] == 2400
    # B -> A swaps who has the extra stage.
    back = json.loads(runner.invoke(app, ["compare", str(b), str(a), "--json"]).stdout)
    assert [s["in"] for s in back["stages"]] == ["both", "both", "a", "both"]


def test_compare_table(two_runs):
    a, b = two_runs
    out = runner.invoke(app, ["compare", str(a), str(b / "report.json")])
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "prune (only in B)" in text
    assert "-2.00 pts" in text and "-40.0%" in text  # quantize: accuracy and bytes 1500 -> 900
    assert "latency b8" in text and "-0.200 ms" in text


def test_compare_refuses_missing_or_foreign_input(two_runs, tmp_path):
    a, _ = two_runs
    out = runner.invoke(app, ["compare", str(a), str(tmp_path / "nope")])
    assert out.exit_code == 2 and "no such run folder" in out.output
    empty = tmp_path / "empty"
    empty.mkdir()
    out = runner.invoke(app, ["compare", str(empty), str(a)])
    assert out.exit_code == 2 and "no report.json" in out.output
    (empty / "report.json").write_text('{"format": "other"}')
    out = runner.invoke(app, ["compare", str(empty), str(a)])
    assert out.exit_code == 2 and "not a compresspipe report" in out.output
    (empty / "report.json").write_text("{oops")
    out = runner.invoke(app, ["compare", str(empty), str(a)])
    assert out.exit_code == 2 and "not a readable report" in out.output
    assert "Traceback" not in out.output


@pytest.mark.parametrize("key, value, message", [
    ("accuracy", "0.9", "stages[1].accuracy"),
    ("bytes", [1, 2], "stages[1].bytes"),
    ("params", 10**400, "stages[1].params"),
    ("latency_ms", {"1": "fast"}, "stages[1].latency_ms.1"),
    ("accuracy", True, "stages[1].accuracy"),
    ("macs", -5, "stages[1].macs"),
])
def test_compare_refuses_a_tampered_report_naming_file_and_key(two_runs, tmp_path, key, value, message):
    a, b = two_runs
    report = json.loads((b / "report.json").read_text())
    report["stages"][1][key] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    out = runner.invoke(app, ["compare", str(a), str(bad)])
    assert out.exit_code == 2, out.output
    assert str(bad) in out.output and message in out.output and "Traceback" not in out.output


def test_every_report_a_run_writes_follows_its_model(tmp_path):
    from compresspipe.report.schema import validate_report

    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1},
                                                     {"type": "quantize", "method": "dynamic"}]))
    assert runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]).exit_code == 0
    report = validate_report(json.loads((tmp_path / "r" / "report.json").read_text()), "report.json")
    assert report.version == 2 and [s.name for s in report.stages] == ["baseline", "train", "quantize"]


def test_compare_two_real_runs(tmp_path):
    """Two real runs of the tiny recipe, one with a smaller hidden layer: the deltas follow."""
    small = tiny_recipe(model={**tiny_recipe()["model"], "kwargs": {"hidden": 16}})
    for name, recipe in (("a", tiny_recipe()), ("b", small)):
        path = write_recipe(tmp_path, recipe, f"{name}.yaml")
        out = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / name), "--quiet"])
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert [s["name"] for s in doc["stages"]] == ["baseline", "train"]
    train = doc["stages"][1]
    # digits-mlp 64 -> hidden -> 10: halving hidden from 32 to 16 removes 16 * (64 + 1 + 10) params.
    assert train["delta"]["params"] == -16 * 75 == train["b"]["params"] - train["a"]["params"]
    assert train["delta"]["bytes"] < 0 and set(train["delta"]["latency_ms"]) == {"1", "8"}
    # A real report.json also renders as HTML (the hand-written ones in tests/engine/test_html.py mirror it).
    page = render_html(json.loads((tmp_path / "b" / "report.json").read_text()))
    assert len(ET.fromstring(page.split("\n", 1)[1]).findall(".//{http://www.w3.org/2000/svg}circle")) == 4


A_RECIPE = tiny_recipe(stages=[{"type": "train", "epochs": 2}, {"type": "train", "name": "finetune", "epochs": 1}])


def test_diff_matches_stages_by_name(tmp_path):
    b = tiny_recipe(seed=1, stages=[{"type": "train", "epochs": 2}, {"type": "train", "name": "extra", "epochs": 1},
                                    {"type": "train", "name": "finetune", "epochs": 3, "lr": 0.01}],
                    gates={"max_accuracy_drop": 0.01})
    pa, pb = write_recipe(tmp_path, A_RECIPE, "a.yaml"), write_recipe(tmp_path, b, "b.yaml")
    out = runner.invoke(app, ["diff", str(pa), str(pb)])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert "seed: 0 -> 1" in lines
    assert "stages[finetune].epochs: 1 -> 3" in lines
    assert any(line.startswith("stages[finetune].lr: ") and line.endswith(" -> 0.01") for line in lines)
    assert "+ stages[extra] (type train, position 1)" in lines
    assert not any(line.startswith("stages[train]") for line in lines)  # inserting a stage shifts nothing
    assert 'gates: null -> {"max_accuracy_drop": 0.01}' in lines  # unset fields of the block left out
    assert len(lines) == 5
    doc = json.loads(runner.invoke(app, ["diff", str(pb), str(pa), "--json"]).stdout)
    assert doc["equal"] is False
    assert {c["path"]: c["change"] for c in doc["changes"]}["stages[extra]"] == "removed"
    assert "- stages[extra]" in runner.invoke(app, ["diff", str(pb), str(pa)]).stdout.splitlines()


def test_diff_equal_after_resolving_defaults_and_reordering(tmp_path):
    explicit = tiny_recipe(stages=[{"type": "train", "epochs": 2}, {"type": "train", "name": "finetune", "epochs": 1,
                                                                    "optimizer": "adam"}])
    pa, pb = write_recipe(tmp_path, A_RECIPE, "a.yaml"), write_recipe(tmp_path, explicit, "b.yaml")
    out = runner.invoke(app, ["diff", str(pa), str(pb)])
    assert out.exit_code == 0 and out.stdout.strip() == "no differences", out.output
    assert json.loads(runner.invoke(app, ["diff", str(pa), str(pb), "--json"]).stdout)["changes"] == []
    swapped = tiny_recipe(stages=list(reversed(A_RECIPE["stages"])))
    out = runner.invoke(app, ["diff", str(pa), str(write_recipe(tmp_path, swapped, "c.yaml"))])
    assert out.stdout.splitlines() == ["stages order: train, finetune -> finetune, train"]


def test_diff_invalid_recipe_exits_2(tmp_path):
    pa = write_recipe(tmp_path, A_RECIPE, "a.yaml")
    bad = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": -1}]), "bad.yaml")
    out = runner.invoke(app, ["diff", str(pa), str(bad)])
    assert out.exit_code == 2 and "bad.yaml" in out.output and "stages[0].epochs" in out.output
    out = runner.invoke(app, ["diff", str(pa), str(tmp_path / "missing.yaml")])
    assert out.exit_code == 2 and "Traceback" not in out.output


def test_compare_and_diff_do_not_import_torch(two_runs, tmp_path):
    a, b = two_runs
    pa = write_recipe(tmp_path, A_RECIPE, "a.yaml")
    code = (
        "import sys; from typer.testing import CliRunner; from compresspipe.cli import app; r = CliRunner();"
        f"assert r.invoke(app, ['compare', {str(a)!r}, {str(b)!r}]).exit_code == 0;"
        f"assert r.invoke(app, ['diff', {str(pa)!r}, {str(pa)!r}]).exit_code == 0;"
        "assert 'torch' not in sys.modules, 'torch imported'; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
