"""export: every format writes, verifies in its runtime, and fails loudly when it should."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compresspipe.artifacts.edits import replace_edit, resize_edit, shape_snapshot
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.cli import app
from compresspipe.errors import RecipeError
from compresspipe.models.factory import build_model
from compresspipe.recipe import load_recipe
from compresspipe.stages.context import StageContext, StageRecord
from compresspipe.stages.export import ExportConfig
from compresspipe.stages.export.stage import ExportStage
from compresspipe.stages.quantize import OnnxInt8Handoff, QuantizeRecord
from tests.fixtures import SMALL_CNN, digits_cnn_recipe, stage_context, tiny_recipe, trained_cnn, write_recipe

runner = CliRunner()


def _export_cfg(**fields) -> ExportConfig:
    base = {"type": "export", "name": "export", "verify": {"batches": 1},
            "int8": {"calibration": {"batches": 2, "batch_size": 32}}}
    return ExportConfig.model_validate({**base, **fields})


def _ctx(tmp_path: Path, recipe: dict, history: dict | None = None) -> StageContext:
    return stage_context(tmp_path, recipe, "export", history=history, stage_dir=tmp_path / "stage")[1]


def _rows(result) -> dict[str, dict]:
    return {r["format"]: r for r in result.details["tables"]["exports"]}


# -- validation before anything runs: exit 2 -----------------------------------------------------------------


def test_an_int8_setting_the_file_would_not_use_is_refused_naming_where_it_belongs(tmp_path):
    quantize = {"type": "quantize", "method": "static", "calibration": {"batches": 2}}

    def load(*stages, folder):
        (tmp_path / folder).mkdir()
        return load_recipe(write_recipe(tmp_path / folder, tiny_recipe(stages=[{"type": "train", "epochs": 1},
                                                                               *stages])))

    with pytest.raises(RecipeError) as err:
        load(quantize, {"type": "export", "formats": ["onnx_int8"],
                        "int8": {"calibration": {"batches": 4}, "observer": "entropy"}}, folder="a")
    text = str(err.value)
    assert "int8.observer" in text and "set observer there" in text
    assert "int8.calibration" in text and "set calibration there" in text
    # the stage's settings reach XNNPACK's calibration too: the same keys are refused with executorch_int8
    with pytest.raises(RecipeError) as err:
        load(quantize, {"type": "export", "formats": ["onnx_int8", "executorch_int8"],
                        "int8": {"per_channel": False}}, folder="b")
    assert "int8.per_channel" in str(err.value) and "set per_channel there" in str(err.value)
    # without a quantize stage that hands the file its settings, the block is the file's
    load({"type": "export", "formats": ["onnx_int8"], "int8": {"calibration": {"batches": 4}}}, folder="c")
    load({"type": "quantize", "method": "fp16"}, {"type": "export", "formats": ["onnx_int8"],
                                                  "int8": {"observer": "entropy"}}, folder="d")
    # the file options are the export's either way
    load(quantize, {"type": "export", "formats": ["onnx_int8"], "int8": {"float_output": False}}, folder="e")
    # a lock file writes every default: the resolved recipe loads again (verify, search's best.yaml, --resume)
    from compresspipe.recipe.loader import validate_recipe_data

    resolved = load(quantize, {"type": "export", "formats": ["onnx_int8", "executorch_int8"]}, folder="g")
    assert validate_recipe_data(resolved.to_data(), check_paths=False).to_data() == resolved.to_data()
    # the names of earlier releases say what they are called now
    for old, new in (("calibrate_method", "observer"), ("calibration_batches", "calibration.batches")):
        with pytest.raises(RecipeError) as err:
            load({"type": "export", "formats": ["onnx_int8"], "int8": {old: 4}}, folder=f"f-{old}")
        assert f"{old} is now {new}" in str(err.value)


@pytest.mark.parametrize("stage,message", [
    ({"opset": 99}, "newer than the installed onnx supports"),
    ({"opset": 5}, "greater than or equal to 7"),
    ({"formats": ["onnx_int8"], "opset": 11}, "onnx_int8 needs opset >= 13"),
    ({"formats": ["onnx", "onnx"]}, "listed twice"),
    ({"formats": ["tflite"]}, "must be one of"),
])
def test_bad_config_is_a_recipe_error(tmp_path, stage, message):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "export", **stage}])
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, recipe))


def test_opset_the_runtime_cannot_run_is_exit_2_naming_the_highest_usable(tmp_path, monkeypatch):
    from compresspipe.runtimes import opset

    assert opset._probe(18, int8=True) is None  # the real probe graph loads in the installed onnxruntime
    real = opset._probe
    monkeypatch.setattr(opset, "_probe", lambda o, int8: "NOT_IMPLEMENTED QuantizeLinear" if o > 20 and int8
                        else real(o, int8))
    opset.runtime_problem.cache_clear()
    try:
        recipe = tiny_recipe(stages=[{"type": "export", "formats": ["onnx_int8"], "opset": 22}])
        result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, recipe))])
        assert result.exit_code == 2
        assert "stages[0].opset" in result.output and "cannot run opset 22 int8 graphs" in result.output
        assert "use opset <= 20" in result.output and "Traceback" not in result.output
        recipe["stages"][0]["formats"] = ["onnx"]  # float graphs at opset 22 are fine
        assert runner.invoke(app, ["validate", str(write_recipe(tmp_path, recipe))]).exit_code == 0
    finally:
        opset.runtime_problem.cache_clear()


def test_missing_runtime_exits_2_naming_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "export", "formats": ["onnx", "executorch"]}]))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "executorch is not installed" in result.output and "compresspipe[mobile]" in result.output


# -- verification outside tolerance: exit 3, files kept ------------------------------------------------------


def test_failed_verification_exits_3_and_keeps_files(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "export", "formats": ["onnx"],
                                  "verify": {"batches": 1, "atol": 1e-12, "rtol": 0}}])
    recipe["model"] = {**SMALL_CNN, "input_shape": [1, 8, 8]}
    recipe["evaluate"]["latency"]["enabled"] = False
    path = write_recipe(tmp_path, recipe)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 3, result.output
    assert "verify.atol" in result.output and "verify.rtol" in result.output and "kept for inspection" in result.output
    kept = tmp_path / "run" / ".01-export.partial" / "export"
    assert (kept / "model.onnx").stat().st_size > 10_000
    checks = json.loads((kept / "manifest.json").read_text())["checks"]
    assert checks[0]["check"].startswith("max |diff|") and 0 < checks[0]["max_abs_diff"] < 1e-3


# -- after structural edits: resize (structured pruning) and replace (factorization) -----------------------


@pytest.mark.int8
def test_exports_after_resize_and_replace_edits(tmp_path):
    state = trained_cnn()
    model = state.module
    before = shape_snapshot(model)
    keep = torch.arange(0, 8, 2)  # structured pruning by hand: c1 keeps 4 of 8 channels
    with torch.no_grad():
        model.c1.weight = nn.Parameter(model.c1.weight[keep].clone())
        model.c1.bias = nn.Parameter(model.c1.bias[keep].clone())
        for name in ("weight", "bias"):
            setattr(model.bn1, name, nn.Parameter(getattr(model.bn1, name)[keep].clone()))
        model.bn1.running_mean, model.bn1.running_var = model.bn1.running_mean[keep], model.bn1.running_var[keep]
        model.c2.weight = nn.Parameter(model.c2.weight[:, keep].clone())
    model.c1.out_channels = model.bn1.num_features = model.c2.in_channels = 4
    state.record(resize_edit(before, model))
    u, s, v = torch.linalg.svd(model.fc1.weight.detach(), full_matrices=False)  # factorization by hand
    low = nn.Sequential(nn.Linear(model.fc1.in_features, 8, bias=False), nn.Linear(8, model.fc1.out_features))
    with torch.no_grad():
        low[0].weight.copy_(torch.diag(s[:8]) @ v[:8])
        low[1].weight.copy_(u[:, :8])
        low[1].bias.copy_(model.fc1.bias)
    model.fc1 = low
    state.record(replace_edit("fc1", low))

    ctx = _ctx(tmp_path, digits_cnn_recipe())
    result = ExportStage(_export_cfg(formats=["onnx", "onnx_int8", "torch_export", "safetensors"],
                                     verify={"batches": 2, "min_agreement": 0.9})).run(state, ctx)
    rows = _rows(result)
    assert result.kind == "export" and result.state is state
    assert all(r["check"] == "pass" for r in rows.values()), rows
    assert rows["onnx"]["max_abs_diff"] < 1e-4 and rows["safetensors"]["max_abs_diff"] == 0
    reloaded = load_model(ctx.stage_dir / "export" / "safetensors")  # replays resize + replace
    assert reloaded.module.c1.out_channels == 4 and isinstance(reloaded.module.fc1, nn.Sequential)
    import onnx

    graph = onnx.load(str(ctx.stage_dir / "export" / "model.onnx")).graph
    c1 = next(t for t in graph.initializer if list(t.dims)[:1] == [4] and len(t.dims) == 4)
    assert list(c1.dims) == [4, 1, 3, 3]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


@pytest.mark.int8
def test_linear_only_model_gets_dynamic_int8_and_sparse_zip(tmp_path):
    recipe = tiny_recipe(stages=[])
    ctx = _ctx(tmp_path, recipe)
    source = {"builtin": "digits-mlp", "kwargs": {"hidden": 256}}
    torch.manual_seed(0)
    module = build_model(source).eval()
    with torch.no_grad():  # unstructured sparsity: 90% of fc1 zeroed
        w = module.fc1.weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
    state = ModelState(module, source, (1, 8, 8), 10)
    result = ExportStage(_export_cfg(formats=["onnx_int8", "safetensors", "torchscript"], sparse=True,
                                     verify={"batches": 2, "min_agreement": 0.8})).run(state, ctx)
    rows = _rows(result)
    assert all(r["check"] == "pass" for r in rows.values()), rows
    assert any("dynamic int8" in n for n in result.notes)
    assert any("TorchScript is deprecated" in n for n in result.notes) and rows["torchscript"]["max_abs_diff"] < 1e-5
    dense, packed = rows["safetensors"]["bytes"], rows["safetensors_zip"]["bytes"]
    assert packed < 0.5 * dense
    assert rows["safetensors_zip"]["max_abs_diff"] == 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(ctx.stage_dir / "export" / "model.int8.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops


def _int8_graph(folder: Path):
    import onnx

    graph = onnx.load(str(folder / "model.int8.onnx")).graph
    weights = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    convs = {}  # weight dims -> how the conv gets its weight
    for node in graph.node:
        if node.op_type == "Conv":
            w = node.input[1]
            source = producer[w].op_type if w in producer else onnx.TensorProto.DataType.Name(weights[w].data_type)
            dims = list(weights[producer[w].input[0]].dims) if w in producer else list(weights[w].dims)
            convs[tuple(dims)] = source
    return graph, convs, producer[graph.output[0].name].op_type


@pytest.mark.int8
def test_int8_onnx_keeps_tiny_convs_float_returns_float_logits_and_short_names(tmp_path):
    # SMALL_CNN: c1 is 1 -> 8 channels, 3x3 (9 inputs per output: float); c2 is 8 -> 16 (72: int8)
    ctx = _ctx(tmp_path, digits_cnn_recipe())
    cfg = _export_cfg(formats=["onnx", "onnx_int8"], verify={"batches": 2, "min_agreement": 0.95})
    result = ExportStage(cfg).run(trained_cnn(), ctx)
    rows = _rows(result)
    assert all(r["check"] == "pass" for r in rows.values()), rows
    graph, convs, last = _int8_graph(ctx.stage_dir / "export")
    assert convs == {(8, 1, 3, 3): "FLOAT", (16, 8, 3, 3): "DequantizeLinear"}
    assert last == "Gemm"  # float logits straight from the last (int8-input) layer
    assert any("1 conv(s) summing over fewer than 16" in n for n in result.notes)
    assert not [t.name for t in graph.initializer if "weight" in t.name]  # short ids, not exporter names
    assert graph.input[0].name == "input" and graph.output[0].name == "logits"

    (tmp_path / "all").mkdir()
    ctx = _ctx(tmp_path / "all", digits_cnn_recipe())
    cfg = _export_cfg(formats=["onnx", "onnx_int8"], verify={"batches": 2, "min_agreement": 0.95}, keep_names=True,
                      int8={"calibration": {"batches": 2, "batch_size": 32}, "float_small_convs": False,
                            "float_output": False})
    result = ExportStage(cfg).run(trained_cnn(), ctx)
    assert all(r["check"] == "pass" for r in _rows(result).values())
    graph, convs, last = _int8_graph(ctx.stage_dir / "export")
    assert set(convs.values()) == {"DequantizeLinear"} and last == "DequantizeLinear"
    assert [t.name for t in graph.initializer if "weight" in t.name]
    assert _rows(result)["onnx_int8"]["bytes"] > rows["onnx_int8"]["bytes"]  # names cost bytes


def test_static_batch_and_low_opset_use_the_torchscript_exporter(tmp_path):
    ctx = _ctx(tmp_path, digits_cnn_recipe())
    result = ExportStage(_export_cfg(formats=["onnx", "torch_export"], opset=13, dynamic_batch=False)).run(
        trained_cnn(), ctx)
    rows = _rows(result)
    assert all(r["check"] == "pass" for r in rows.values()), rows
    assert any("TorchScript-based exporter" in n for n in result.notes)
    assert rows["onnx"]["latency b8 ms"] is None and rows["onnx"]["latency b1 ms"] > 0
    import onnx

    model = onnx.load(str(ctx.stage_dir / "export" / "model.onnx"))
    assert model.opset_import[0].version == 13
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


# -- the quantize stage's hand-off, recorded on the model -----------------------------------------------------


@pytest.mark.int8
def test_onnx_int8_quantizes_the_float_model_the_quantize_record_names(tmp_path):
    float_state = trained_cnn()
    float_dir = tmp_path / "01-train"
    save_model(float_state, float_dir)
    quantized = float_state.clone()
    quantized.put(QuantizeRecord(method="static", float_stage="train", onnx_int8=OnnxInt8Handoff(
        method="static", per_channel=False, observer="minmax", calibration_batches=2, batch_size=32)))
    history = {"train": StageRecord(1, "train", "train", float_dir, {})}
    ctx = _ctx(tmp_path, digits_cnn_recipe(), history)
    result = ExportStage(_export_cfg(formats=["onnx_int8"], verify={"batches": 2, "min_agreement": 0.9})).run(
        quantized, ctx)
    row = _rows(result)["onnx_int8"]
    assert row["check"] == "pass" and row["top1_agreement"] >= 0.9
    assert any("per-tensor" in n for n in result.notes)  # the quantize stage's settings were used


@pytest.mark.int8
def test_the_histogram_observer_reaches_the_file_as_its_own_range_search_not_entropy(tmp_path):
    """observer: histogram (L2-optimal ranges) used to become ONNX Runtime's entropy (KL) calibration in the file;
    now the file's activation ranges are the same search, on the histograms ONNX Runtime collects."""
    import onnx
    from onnx import numpy_helper

    from compresspipe.runtimes import onnx_cache

    def scales(observer: str | None, folder: str, export_observer: str = "entropy") -> tuple[dict[str, float], list[str]]:
        onnx_cache.clear()
        state = trained_cnn()
        state.put(QuantizeRecord(method="static", float_stage="train", onnx_int8=OnnxInt8Handoff(
            method="static", per_channel=True, observer=observer or "minmax", calibration_batches=2, batch_size=32)))
        save_model(trained_cnn(), tmp_path / folder / "01-train")
        ctx = _ctx(tmp_path / folder, digits_cnn_recipe(),
                   {"train": StageRecord(1, "train", "train", tmp_path / folder / "01-train", {})})
        config = _export_cfg(formats=["onnx_int8"], verify={"batches": 2, "min_agreement": 0.5},
                             int8={"calibration": {"batches": 2, "batch_size": 32}, "observer": export_observer})
        if observer is None:  # no hand-off: the export's own int8 block
            state.records.clear()
        result = ExportStage(config).run(state, ctx)
        graph = onnx.load(str(ctx.stage_dir / "export" / "model.int8.onnx")).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        out = {n.input[0]: float(inits[n.input[1]]) for n in graph.node
               if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1}
        return out, result.notes

    l2, l2_notes = scales("histogram", "l2")
    entropy, entropy_notes = scales(None, "entropy")
    assert any("histogram (the L2-optimal range search" in n for n in l2_notes), l2_notes
    assert any("entropy calibration" in n for n in entropy_notes), entropy_notes
    shared = set(l2) & set(entropy)
    assert shared and any(abs(l2[t] - entropy[t]) > 1e-6 * max(entropy[t], 1e-12) for t in shared)
    # one algorithm whichever block names it: the export's own `observer: histogram` writes the same scales
    from_export, _ = scales(None, "export-histogram", export_observer="histogram")
    assert from_export == l2


# -- torchvision classifiers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,formats", [
    ("resnet18", {}, ["onnx", "onnx_int8", "torch_export", "safetensors"]),
    ("mobilenet_v2", {"width_mult": 0.25}, ["onnx", "onnx_int8", "torch_export"]),  # all formats: make acceptance
])
@pytest.mark.int8
def test_torchvision_classifiers_export(tmp_path, name, kwargs, formats):
    recipe = tiny_recipe(model={"torchvision": name, "kwargs": {"num_classes": 10, **kwargs},
                                "input_shape": [3, 32, 32]},
                         data={"dataset": "synthetic", "shape": [3, 32, 32], "samples": 48, "eval_batch_size": 16},
                         stages=[])
    recipe["evaluate"]["latency"]["enabled"] = False
    ctx = _ctx(tmp_path, recipe)
    source = {"torchvision": name, "kwargs": {"num_classes": 10, **kwargs}}
    torch.manual_seed(0)
    state = ModelState(build_model(source).eval(), source, (3, 32, 32), 10)
    result = ExportStage(_export_cfg(formats=formats, verify={"batches": 1, "min_agreement": 0.5})).run(state, ctx)
    rows = _rows(result)
    assert all(r["check"] == "pass" for r in rows.values()), rows
    assert rows["onnx"]["max_abs_diff"] < 1e-4
    # resnet18: weights dominate; mobilenet_v2 at 1/4 width: per-channel scales of its many thin layers count
    assert rows["onnx"]["bytes"] / rows["onnx_int8"]["bytes"] > (3.5 if name == "resnet18" else 2.5)


# -- after the real prune, factorize and quantize stages ---------------------------------------------------------


@pytest.mark.int8
def test_export_after_prune_factorize_and_quantize_stages(tmp_path):
    recipe = tiny_recipe(model={**SMALL_CNN, "input_shape": [1, 8, 8]}, stages=[
        {"type": "train", "epochs": 3, "lr": 0.01},
        {"type": "prune", "method": "structured", "amount": 0.5},
        {"type": "factorize", "rank": {"ratio": 0.5}},
        {"type": "export", "name": "export-float", "formats": ["onnx", "torch_export", "safetensors"],
         "verify": {"batches": 1}},
        {"type": "quantize", "method": "static", "calibration": {"batches": 2}},
        {"type": "export", "formats": ["onnx", "onnx_int8", "torch_export", "executorch", "safetensors"],
         "verify": {"batches": 1, "min_agreement": 0.9}},
    ])
    recipe["evaluate"]["latency"]["enabled"] = False
    path = write_recipe(tmp_path, recipe)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    float_rows = {r["format"]: r for r in by_name["export-float"]["details"]["tables"]["exports"]}
    int8_rows = {r["format"]: r for r in by_name["export"]["details"]["tables"]["exports"]}
    assert float_rows["onnx"]["max_abs_diff"] < 1e-4 and float_rows["torch_export"]["max_abs_diff"] < 1e-4
    assert all(r["check"] == "pass" for r in int8_rows.values()), int8_rows
    assert int8_rows["onnx_int8"]["top1_agreement"] >= 0.9
    assert int8_rows["executorch"]["top1_agreement"] >= 0.9
    assert not any("TorchScript-based exporter" in n for n in by_name["export"]["notes"])  # dynamo took it
    import onnx  # the quantized model's own arithmetic: activations rounded to its calibrated uint8 grid

    ops = {n.op_type for n in onnx.load(str(tmp_path / "run" / "06-export" / "export" / "model.onnx")).graph.node}
    assert {"Round", "Clip"} <= ops
    assert int8_rows["safetensors"]["max_abs_diff"] == 0  # the quantized torch model reloads from model.json
    assert any("static int8" in n for n in by_name["export"]["notes"])
    # the quantize row's deploy file was built from the same float model and settings: not calibrated twice
    shipped = tmp_path / "run" / "05-quantize" / "deploy" / "model.int8.onnx"
    assert shipped.read_bytes() == (tmp_path / "run" / "06-export" / "export" / "model.int8.onnx").read_bytes()
    assert any("reused, not calibrated again" in n for n in by_name["export"]["notes"])
    assert not any("reused, not calibrated again" in n for n in by_name["quantize"]["notes"])


@pytest.mark.int8
def test_torchvision_classifier_after_prune_and_quantize_exports(tmp_path):
    model = {"torchvision": "resnet18", "kwargs": {"num_classes": 10}, "input_shape": [3, 32, 32]}
    recipe = tiny_recipe(model=model, data={"dataset": "synthetic", "shape": [3, 32, 32], "samples": 96,
                                            "num_classes": 10, "batch_size": 32, "eval_batch_size": 16}, stages=[
        {"type": "train", "epochs": 1, "lr": 1.0e-3},
        {"type": "prune", "method": "structured", "amount": 0.5},
        {"type": "quantize", "method": "static", "calibration": {"batches": 2}},
        # executorch too in `make acceptance` (lowering every fake-quant op of a torchvision model takes a minute)
        {"type": "export", "formats": ["onnx", "onnx_int8", "torch_export", "safetensors"],
         "verify": {"batches": 1, "min_agreement": 0.5}},
    ])
    recipe["evaluate"]["latency"]["enabled"] = False
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {r["format"]: r for r in report["stages"][-1]["details"]["tables"]["exports"]}
    assert all(r["check"] == "pass" for r in rows.values()), rows
    assert rows["safetensors"]["max_abs_diff"] == 0


# -- files people open: no warnings when they load ----------------------------------------------------------


@pytest.mark.int8
def test_every_onnx_file_loads_in_onnxruntime_without_a_warning(tmp_path):
    """ONNX Runtime warns on every load about, e.g., initializers no node reads; our files give it nothing to say."""
    import subprocess
    import sys

    import onnx

    float_state = trained_cnn()
    save_model(float_state, tmp_path / "01-train")
    quantized = float_state.clone()
    quantized.put(QuantizeRecord(method="static", float_stage="train", onnx_int8=OnnxInt8Handoff(
        method="static", per_channel=True, observer="minmax", calibration_batches=2, batch_size=32)))
    ctx = _ctx(tmp_path, digits_cnn_recipe(), {"train": StageRecord(1, "train", "train", tmp_path / "01-train", {})})
    ExportStage(_export_cfg(formats=["onnx", "onnx_int8"], verify={"batches": 1, "min_agreement": 0.8})).run(
        quantized, ctx)
    for path in sorted((ctx.stage_dir / "export").glob("*.onnx")):
        graph = onnx.load(str(path)).graph
        read = {name for node in graph.node for name in node.input}
        assert [i.name for i in graph.initializer if i.name not in read] == [], path.name
        code = ("import onnxruntime as ort, sys; ort.set_default_logger_severity(1); "
                "o = ort.SessionOptions(); o.log_severity_level = 1; "
                "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])")
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-1000:]
        warnings = [line for line in done.stderr.splitlines() if "[W:" in line or " W:" in line]
        assert warnings == [], (path.name, warnings)


def test_warnings_while_exporting_become_notes_once_each_and_none_is_dropped_unseen():
    import warnings
    from types import SimpleNamespace

    from compresspipe.runtimes.job import MAX_WARNING_NOTES, warnings_as_notes

    job = SimpleNamespace(notes=[])
    with warnings_as_notes(job, "torchscript"):  # type: ignore[arg-type]
        for _ in range(3):
            warnings.warn("`torch.jit.trace` is deprecated", FutureWarning, stacklevel=1)
        for i in range(MAX_WARNING_NOTES + 2):
            warnings.warn(f"caveat {i}\nsecond line", UserWarning, stacklevel=1)
    assert job.notes[0] == "torchscript: FutureWarning: `torch.jit.trace` is deprecated"
    assert len(job.notes) == MAX_WARNING_NOTES + 1
    assert job.notes[-1] == "torchscript: 3 more distinct warning(s)"
    assert "caveat 0" in job.notes[1] and "second line" not in job.notes[1]


def test_float_files_are_judged_relative_to_the_scale_of_their_outputs():
    """Float32 rounding grows with the values a network carries: the same |diff| passes on logits of 90 and fails on
    logits of 1 (verify.rtol is relative to the largest |output|); rtol 0 judges by atol alone."""
    from types import SimpleNamespace

    from compresspipe.stages.export import ExportConfig
    from compresspipe.stages.export.stage import ExportStage

    def judge(max_abs_output: float, diff: float = 3e-4, **verify: float) -> str:
        config = ExportConfig(type="export", formats=["onnx"], verify=verify)
        job = SimpleNamespace(config=config, dtype=torch.float32, state=SimpleNamespace(edits=[]))
        metrics = {"max_abs_diff": diff, "max_abs_output": max_abs_output, "top1_agreement": 1.0}
        ex = SimpleNamespace(int8=False)
        return ExportStage._judge(None, "onnx", ex, metrics, job)  # type: ignore[arg-type]

    assert judge(90.0) == "pass"  # 3e-4 <= 1e-4 + 1e-4 * 90
    failed = judge(1.0)
    assert failed.startswith("max |diff| from PyTorch 0.0003 > verify.atol 0.0001 + verify.rtol 0.0001"), failed
    assert judge(90.0, rtol=0) != "pass"
    assert judge(90.0, diff=float("nan")) != "pass"  # a NaN output never passes
    assert judge(90.0, atol=1e-3, rtol=0) == "pass"
