"""The example recipes are documentation that cannot rot: each validates, plans, and runs at a reduced budget.

BUDGET is the one table of what each recipe gives up to run in seconds (epochs, samples, model width) and what
its finished run must show; a recipe added to recipes/ without a row here fails `test_every_recipe_has_a_budget`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compresspipe.artifacts.model import load_model
from compresspipe.recipe import load_recipe
from tests.fixtures import cli

RECIPES = Path(__file__).parent.parent / "recipes"
SMALL = ["model.kwargs={width: 8, hidden: 32}"]
FAST = ["evaluate.latency.iters=2", "evaluate.latency.warmup=0", "deploy.rounds=3"]


def _quickstart(report: dict[str, Any], run: Path) -> None:
    final = report["stages"][-1]
    assert report["deploy"]["runtime"] == "onnxruntime"
    assert [s["format"] for s in report["stages"]][-2:] == ["onnx_int8", "onnx_int8"]  # quantize and export ship int8
    assert all(s["format"] == "onnx" for s in report["stages"][:-2])
    assert final["vs_reference"]["size_reduction"] > 8 and final["files"] == ["05-export/export/model.int8.onnx"]


def _prune(report: dict[str, Any], run: Path) -> None:
    pruned = report["stages"][-1]
    assert pruned["kind"] == "structural" and pruned["vs_reference"]["mac_reduction"] > 3.5


def _distill(report: dict[str, Any], run: Path) -> None:
    folder = run / "02-distill"
    desc = json.loads((folder / "model.json").read_text())
    assert desc["source"] == {"builtin": "digits-cnn", "kwargs": {"width": 16, "hidden": 64}}
    assert desc["edits"] == []
    state = load_model(folder)
    assert set(load_file(str(folder / "model.safetensors"))) == set(state.module.state_dict())  # no adapter
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["kind"] == "structural" and metrics["details"]["student"] == "digits-cnn(width=16, hidden=64)"
    assert metrics["details"]["tables"]["feature losses"][0]["adapter"] == "Conv2d"
    assert not metrics["details"]["teacher_cached"] and metrics["details"]["teacher_batches_run"] > 0
    assert metrics["params"] * 3.5 < json.loads((run / "01-teacher" / "metrics.json").read_text())["params"]
    assert not (folder / ".checkpoints").exists()


def _factorize(report: dict[str, Any], run: Path) -> None:
    train, fact = report["stages"][-2], report["stages"][-1]
    assert fact["kind"] == "structural" and fact["params"] < train["params"] and fact["macs"] < train["macs"]
    folder = run / fact["folder"]
    layers = json.loads((folder / "factorization.json").read_text())["layers"]
    assert [r["layer"] for r in layers] == ["fc1", "fc2"]
    fc1 = layers[0]
    assert fc1["skipped"] is None and fc1["params after"] == fc1["rank"] * (1024 + 128) + 128
    assert "## factorize: per layer" in (run / "report.md").read_text()
    model = load_model(folder)
    assert isinstance(model.module.fc1, nn.Sequential)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.module(x), load_model(folder).module(x))


def _quantize(report: dict[str, Any], run: Path) -> None:
    quantized = report["stages"][-1]
    assert quantized["kind"] == "quantized" and quantized["format"] == "onnx_int8"
    assert quantized["vs_reference"]["size_reduction"] > 2.5 and quantized["torch"]["emulated"]


def _export(report: dict[str, Any], run: Path) -> None:
    folder = run / "02-export" / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "compresspipe.export" and manifest["version"] == 1
    by_format = {e["format"]: e for e in manifest["files"]}
    assert set(by_format) == {"onnx", "onnx_int8", "torch_export", "safetensors", "executorch", "executorch_int8"}
    for entry in manifest["files"]:
        path = folder / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["bytes"] == path.stat().st_size and len(entry["how_to_load"]) == 2
        assert entry["num_classes"] == 10 and entry["input"]["shape"][1:] == [1, 8, 8]
        assert "divided by 16" in entry["preprocessing"]  # what a caller must do to raw digits
    assert by_format["onnx"]["input"]["shape"][0] == "batch" and by_format["executorch"]["input"]["shape"][0] == 1
    assert by_format["onnx_int8"]["int8"]["cpu_target"] == "portable"
    assert not list(folder.glob(".*")), "temporary files left in the export folder"
    rows = {r["format"]: r for r in report["stages"][-1]["details"]["tables"]["exports"]}
    assert all(r["check"] == "pass" for r in rows.values())
    assert rows["onnx"]["max_abs_diff"] < 1e-4 and rows["executorch"]["max_abs_diff"] < 1e-4
    assert rows["onnx_int8"]["top1_agreement"] >= 0.97 and rows["executorch_int8"]["top1_agreement"] >= 0.97
    # int8 weights: fewer bytes than float32 (on a model this tiny, graph overhead keeps it near 2x)
    assert rows["onnx"]["bytes"] / rows["onnx_int8"]["bytes"] > 1.8
    assert rows["executorch"]["bytes"] / rows["executorch_int8"]["bytes"] > 1.8
    assert rows["onnx"]["latency b1 ms"] > 0 and rows["onnx"]["latency b64 ms"] > 0
    assert rows["executorch"]["latency b64 ms"] is None  # a .pte runs batch 1 only
    assert report["stages"][-1]["format"] == "onnx_int8"  # what the export row ships


def _search(doc: dict[str, Any], out: Path) -> None:
    assert doc["format"] == "compresspipe.search" and [t["state"] for t in doc["trials"]] == ["complete"] * 2
    assert doc["trials"][1]["reused"]["stages"] >= 2  # the second trial starts from the first one's train stage
    best = load_recipe(out / "best.yaml")
    assert best.search is None and [s.type for s in best.stages][-2:] == ["quantize", "export"]
    for trial in doc["trials"]:
        report = json.loads((out / trial["folder"] / "report.json").read_text())
        assert report["status"] == "complete" and report["stages"][-1]["format"] == "onnx_int8"


def _huggingface_text(report: dict[str, Any], run: Path) -> None:
    train, pruned, quantized, export = report["stages"][1:]
    assert pruned["kind"] == "structural" and pruned["params"] < 0.8 * train["params"]
    assert "attention heads per layer now [2, 2]" in " ".join(pruned["notes"])
    assert quantized["format"] == "onnx_int8" and export["format"] == "onnx_int8"
    assert export["vs_reference"]["size_reduction"] > 2
    manifest = json.loads((run / export["folder"] / "export" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["files"][0]["inputs"]] == ["input_ids", "attention_mask"]
    # ONNX Runtime's shape inference leaves nothing in the working directory (the tests run in tmp_path)
    assert not [p.name for p in Path.cwd().iterdir() if p.name.startswith("sym_shape") or p.suffix == ".data"]


def _timm(report: dict[str, Any], run: Path) -> None:
    train, pruned = report["stages"][1:3]
    assert pruned["kind"] == "structural" and pruned["macs"] < 0.5 * train["macs"]
    assert report["stages"][-1]["format"] == "onnx_int8"
    fidelity = report["stages"][-1]["fidelity"]
    assert fidelity["source"] == "float model" and 0 <= fidelity["agreement"] <= 1
    assert report["recommendation"]["files"], report["recommendation"]


def _python_model(report: dict[str, Any], run: Path) -> None:
    desc = json.loads((run / "01-train" / "model.json").read_text())
    assert desc["source"]["python"].endswith("my_model.py:build") and len(desc["source"]["sha256"]) == 64
    assert report["stages"][2]["kind"] == "structural"  # fold_bn
    assert report["stages"][-1]["format"] == "onnx_int8"


def _fold_bn(report: dict[str, Any], run: Path) -> None:
    train, folded = report["stages"][-2:]
    assert folded["format"] == "torch" and folded["params"] < train["params"]
    assert folded["accuracy"] == train["accuracy"]


def _causal_lm(report: dict[str, Any], run: Path) -> None:
    baseline, train, pruned = report["stages"]
    perplexity = train["metrics"]["perplexity"]
    assert perplexity < 0.2 * baseline["metrics"]["perplexity"]
    unigram = json.loads((run / "01-train" / "model.json").read_text())["io"]["preprocessing"]["unigram_perplexity"]
    assert perplexity < unigram  # real text: even two tiny epochs beat token frequencies
    assert pruned["kind"] == "structural" and pruned["params"] < train["params"]
    assert "attention heads per layer now [2, 2]" in " ".join(pruned["notes"])
    config = load_model(run / pruned["folder"]).module.model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)


# recipe -> (--set overrides that bring it down to seconds, what its finished run must show)
BUDGET: dict[str, tuple[list[str], Callable[[dict[str, Any], Path], None]]] = {
    "quickstart.yaml": (["stages.train.epochs=2", "stages.prune.finetune.epochs=1", "stages.distill.epochs=1",
                         "stages.quantize.calibration.batches=2", "gates=null", *FAST], _quickstart),
    "prune.yaml": (["data.max_samples=300", "stages.0.epochs=2", "stages.1.finetune.epochs=1",
                    "gates.max_accuracy_drop=1", *SMALL, *FAST], _prune),
    "distill.yaml": (["data.max_samples=400", "stages.0.epochs=2", "stages.1.epochs=2",
                      "evaluate.latency.batch_sizes=[1]", *FAST], _distill),
    "factorize.yaml": (["stages.0.epochs=2", "stages.1.finetune.epochs=1", "data.max_samples=400", *FAST],
                       _factorize),
    "quantize.yaml": (["data.max_samples=400", "stages.0.epochs=3", "stages.1.calibration.batches=2",
                       "gates.max_accuracy_drop=0.05", "gates.min_size_reduction=2.5", *SMALL, *FAST], _quantize),
    "fold_bn.yaml": (["stages.0.epochs=2", "data.max_samples=400", *FAST], _fold_bn),
    "huggingface_text.yaml": (["data.samples=192", "data.seq_len=16", "model.huggingface.config.hidden_size=32",
                               "model.huggingface.config.num_hidden_layers=2", "model.huggingface.config.vocab_size=64",
                               "model.huggingface.config.intermediate_size=64", "data.vocab_size=64",
                               "stages.0.epochs=2", "stages.0.lr=3.0e-3", "stages.1.finetune.epochs=1",
                               "gates=null", "evaluate.latency.batch_sizes=[1]", *FAST], _huggingface_text),
    "causal_lm.yaml": (["data.max_chars=15000", "data.seq_len=32", "model.huggingface.config.hidden_size=64",
                        "model.huggingface.config.intermediate_size=128", "model.huggingface.config.num_hidden_layers=2",
                        "model.huggingface.config.num_attention_heads=4", "stages.0.epochs=2", "stages.0.lr=1.0e-2",
                        "stages.1.finetune.epochs=1", "evaluate.latency.batch_sizes=[1]", *FAST], _causal_lm),
    "timm.yaml": (["data.samples=128", "data.shape=[3, 16, 16]", "model.input_shape=[3, 16, 16]",
                   "model.timm=resnet10t", "stages.0.epochs=1", "stages.1.finetune.epochs=1",
                   "stages.2.calibration.batches=1", "gates=null", "evaluate.latency.batch_sizes=[1]",
                   # one epoch on 128 images leaves the model near chance, where int8 flips close calls on any CPU:
                   # the fidelity limits are off like the other gates (the figures are still measured and checked)
                   "deploy.fidelity.min_agreement=0", "deploy.fidelity.max_drop=1", *FAST], _timm),
    "python_model.yaml": (["data.max_samples=400", "stages.0.epochs=2", "stages.2.finetune.epochs=1",
                           "model.kwargs.width=8", "gates=null", *FAST], _python_model),
    "export.yaml": (["stages.0.epochs=3", "stages.0.lr=0.01", "data.max_samples=700", "stages.1.verify.batches=1",
                     "stages.1.int8.calibration.batches=2", *SMALL, *FAST], _export),
    # a search runs as `compresspipe search`: two tiny trials, every stage at the quickstart's reduced budget
    "search.yaml": (["stages.train.epochs=2", "stages.train.expect=null", "stages.prune.finetune.epochs=1",
                     "vars.distill_epochs=1", "stages.quantize.calibration.batches=2", "data.max_samples=500",
                     "gates=null", "search.n_trials=2", "search.space={vars.amount: {choices: [0.5, 0.625]}}",
                     "search.sampler=grid", "search.pick=null", "search.early_stop=null", *FAST], _search),
}


def test_every_recipe_has_a_budget():
    assert {p.name for p in RECIPES.glob("*.yaml")} == set(BUDGET)


@pytest.mark.parametrize("name", sorted(BUDGET))
@pytest.mark.int8
def test_example_recipe_runs_at_reduced_budget(tmp_path, name):
    sets, check = BUDGET[name]
    recipe = load_recipe(RECIPES / name, allow_code=True)
    assert recipe.stages and recipe.deploy.runtime != "auto", f"{name}: name a deploy target"
    out = tmp_path / "run"
    if recipe.search is not None:  # a search example runs as a search, with a few tiny trials
        result = cli("search", RECIPES / name, "--out", out, "-q", *[a for s in sets for a in ("--set", s)])
        assert result.exit_code == 0, result.output
        check(json.loads((out / "search.json").read_text()), out)
        return
    result = cli("run", RECIPES / name, "--out", out, "-q", "--allow-code", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["deploy"]["runtime"] == recipe.deploy.runtime
    for row in report["stages"]:  # every row's figures come from a file that is there
        assert row["files"] and all((out / f).is_file() for f in row["files"]), row["name"]
        assert row["bytes"] == sum((out / f).stat().st_size for f in row["files"])
    check(report, out)


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_plan_runs_on_every_recipe_without_training(name, tmp_path, monkeypatch):
    import compresspipe.stages.context
    import compresspipe.training.loop

    def no_training(*args, **kwargs):  # "seconds, not a training run", without timing it on a loaded machine
        raise AssertionError("plan trained a model")

    for module in (compresspipe.training.loop, compresspipe.stages.context):
        monkeypatch.setattr(module, "fit", no_training)
    result = cli("plan", RECIPES / name, "--json", "--allow-code")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["name"] for s in plan["stages"]][0] == "baseline" and len(plan["stages"]) > 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_every_recipe_loads_again_from_its_lock_file(name):
    """recipe.lock.yaml stores the resolved recipe with every default written out; verify, --resume and the
    search's best.yaml read it back, so no check may refuse a value only because it was written."""
    from compresspipe.recipe.loader import load_recipe, validate_recipe_data

    recipe = load_recipe(RECIPES / name, allow_code=True)
    again = validate_recipe_data(recipe.to_data(), check_paths=False, allow_code=True)
    assert again.to_data() == recipe.to_data()
