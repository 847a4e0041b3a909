"""A reference at chance is loud: a warning in the terminal and report.json, and a gate that can require more."""

from __future__ import annotations

import json

from tests.fixtures import cli, tiny_recipe, write_recipe

UNTRAINED = [{"type": "prune", "method": "magnitude", "amount": 0.1}]  # no train stage: the baseline is the reference


def test_untrained_reference_is_warned_about_and_the_gate_fails(tmp_path):
    recipe = tiny_recipe(stages=UNTRAINED, gates={"min_reference_accuracy": 0.5})
    result = cli("run", write_recipe(tmp_path, recipe), "--out", tmp_path / "r")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert any("near chance" in w for w in report["warnings"]), report["warnings"]
    assert "near chance" in " ".join(result.output.split())
    gate = next(g for g in report["gates"] if g["gate"] == "min_reference_accuracy")
    assert not gate["passed"] and gate["value"] < 0.5


def test_trained_reference_raises_no_warning_and_passes_the_gate(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 3, "lr": 1.0e-2}, *UNTRAINED],
                         gates={"min_reference_accuracy": 0.5})
    result = cli("run", write_recipe(tmp_path, recipe), "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["warnings"] == []
    assert all(g["passed"] for g in report["gates"])
