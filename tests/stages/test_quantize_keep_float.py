"""quantize keep_float: mixed precision, judged on the file that ships, carried into the int8 ONNX file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures import cli, run, tiny_recipe, write_recipe

DIGITS = {"dataset": "digits", "batch_size": 64, "eval_batch_size": 64, "max_samples": 600}


def _outlier_mlp(tmp_path):
    """A trained digits-mlp whose fc1 holds huge weights on the first pixel, which is 0 in every digit: the float
    model ignores them, but int8 fc1 (whatever its scales) rounds every other weight of fc1 to nothing."""
    from sklearn.datasets import load_digits
    from torch import nn

    from compresspipe.models.builtin import digits_mlp

    torch.manual_seed(0)
    model = digits_mlp(hidden=64)
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, 64) / 16.0
    assert float(x[:, 0].abs().max()) == 0.0
    y = torch.as_tensor(bunch.target)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 128].reshape(-1, 1, 8, 8)), y[i:i + 128]).backward()
            opt.step()
    with torch.no_grad():
        model.fc1.weight[:, 0] = 400.0
    path = tmp_path / "outlier.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _recipe(checkpoint, keep_float):
    stage = {"type": "quantize", "method": "static", "calibration": {"batches": 2}}
    if keep_float is not None:
        stage["keep_float"] = {"max_accuracy_drop": keep_float}
    return tiny_recipe(model={"builtin": "digits-mlp", "kwargs": {"hidden": 64}, "checkpoint": str(checkpoint),
                              "input_shape": [1, 8, 8]},
                       data=DIGITS, deploy={"runtime": "onnxruntime", "rounds": 3},
                       evaluate={"latency": {"batch_sizes": [1], "warmup": 0, "iters": 2}}, stages=[stage])


@pytest.mark.int8
def test_keep_float_keeps_the_sensitive_layer_float_in_the_shipped_file(tmp_path):
    checkpoint = _outlier_mlp(tmp_path)
    whole = _recipe(checkpoint, None)  # every layer int8, deploy.fidelity's mixed precision and limits off
    whole["deploy"]["fidelity"] = {"mixed_precision": False, "min_agreement": 0.0, "max_drop": 1.0}
    full = run(tmp_path, whole, "full").report["stages"][-1]
    assert -full["vs_reference"]["accuracy_delta"] > 0.02  # every layer int8: the file loses a lot
    mixed = run(tmp_path, _recipe(checkpoint, 0.02), "mixed").report
    row = mixed["stages"][-1]
    assert row["format"] == "onnx_int8" and -row["vs_reference"]["accuracy_delta"] <= 0.02  # on the shipped file
    assert row["details"]["keep_float"]["layers"] == ["fc1"]
    tried = row["details"]["tables"]["mixed precision"]
    assert [t["float layers"] for t in tried] == ["(none)", "fc1"] and [t["fits"] for t in tried] == ["no", "yes"]
    assert any("judged on the onnx_int8 file in onnxruntime" in n for n in row["notes"])
    assert any("1 layer(s) stay float (the quantize stage's keep_float: fc1)" in n for n in row["notes"])
    table = {r["layer"]: r for r in row["details"]["tables"]["per layer"]}
    assert table["fc1"]["quantized"] == "no" and "keep_float" in table["fc1"]["reason"]
    assert table["fc2"]["quantized"] == "yes"
    record = json.loads((tmp_path / "mixed" / row["folder"] / "model.json").read_text())["records"]["quantize"]
    assert record["onnx_int8"]["keep_float"] == ["fc1"]


@pytest.mark.int8
def test_without_keep_float_the_fidelity_gate_keeps_the_diverging_layer_float_by_itself(tmp_path):
    checkpoint = _outlier_mlp(tmp_path)
    row = run(tmp_path, _recipe(checkpoint, None), "auto").report["stages"][-1]
    assert row["fidelity"]["passed"] and "fc1" in row["fidelity"]["float_layers"], row["fidelity"]
    assert -row["vs_reference"]["accuracy_delta"] <= 0.02


@pytest.mark.parametrize("stage, message", [
    ({"method": "fp16", "keep_float": {"max_accuracy_drop": 0.01}}, "keep_float works with methods static"),
    ({"method": "qat", "keep_float": {"max_accuracy_drop": 0.01}}, "keep_float works with methods static"),
    ({"keep_float": {"max_accuracy_drop": 1.5}}, "keep_float.max_accuracy_drop: must be less than or equal to 1"),
])
def test_keep_float_is_validated(tmp_path, stage, message):
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "quantize", **stage}]))
    result = cli("validate", path)
    assert result.exit_code == 2 and message in result.output, result.output


def test_keep_float_refuses_a_runtime_that_would_ignore_it(tmp_path):
    recipe = tiny_recipe(deploy={"runtime": "torch"}, stages=[{"type": "quantize", "keep_float": {
        "max_accuracy_drop": 0.01}}, {"type": "export", "formats": ["executorch_int8"]}])
    recipe["deploy"] = {"runtime": "executorch"}
    result = cli("validate", write_recipe(tmp_path, recipe))
    if "executorch" in result.output and "not installed" in result.output:
        pytest.skip("executorch is not installed")
    assert result.exit_code == 2 and "keep_float would not reach the file that ships" in result.output


def test_layer_nodes_pairs_torch_layers_with_onnx_nodes_by_order_and_shape(tmp_path):
    import onnx

    from compresspipe.runtimes.onnx_int8 import layer_nodes
    from tests.fixtures import trained_cnn

    module = trained_cnn().module
    torch.onnx.export(module, (torch.zeros(2, 1, 8, 8),), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    found, missing = layer_nodes(module, model, ["c2", "fc2"], (1, 8, 8))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert missing == [] and [ops[n] for n in found] == ["Conv", "Gemm"]
    del model.graph.node[[n.name for n in model.graph.node].index(found[0])]  # a graph that does not line up
    assert layer_nodes(module, model, ["c2"], (1, 8, 8)) == ([], ["c2"])
