"""quantize: every method gives a smaller artifact that reloads without pickle to identical outputs."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.data.sources import load_data
from compresspipe.engine.artifacts import ModelState, load_model, save_model
from compresspipe.engine.context import StageContext, StageRecord
from compresspipe.engine.executor import RunOptions, run_recipe
from compresspipe.engine.ui import UI
from compresspipe.errors import RecipeError, StageConfigError
from compresspipe.models.factory import build_model
from compresspipe.recipe import load_recipe
from compresspipe.stages.quantize.layers import pack_int4, quantize_weight, unpack_int4
from tests.fixtures import tiny_recipe, write_recipe

runner = CliRunner()
CNN = {"builtin": "digits-cnn", "kwargs": {"width": 8, "hidden": 32}, "input_shape": [1, 8, 8]}
FAST = {"latency": {"batch_sizes": [4], "warmup": 0, "iters": 1, "threads": 1}}


DIGITS = {"dataset": "digits", "batch_size": 64, "max_samples": 400, "eval_batch_size": 64}


def _context(tmp_path, model_spec, data, stage, accuracy=None):
    """A stage context as the executor builds it; `accuracy`: the previous stage's, as its metrics say."""
    recipe = tiny_recipe(model=model_spec, data=data, evaluate=FAST, stages=[stage])
    parsed = load_recipe(write_recipe(tmp_path, recipe))
    splits = load_data(parsed.data, 0, tuple(model_spec["input_shape"]))
    ctx = StageContext(parsed, 1, "quantize", tmp_path, torch.device("cpu"), 0, splits, UI(quiet=True),
                       {"train": StageRecord(0, "train", "train", tmp_path, {"accuracy": accuracy})})
    return parsed.stages[0], ctx


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits-cnn (small) trained for a few epochs, saved as an artifact; plus real validation inputs."""
    tmp = tmp_path_factory.mktemp("trained")
    recipe = tiny_recipe(model=CNN, data=DIGITS, evaluate={"latency": {"enabled": False}},
                         stages=[{"type": "train", "epochs": 3, "lr": 5e-3}])
    path = write_recipe(tmp, recipe)
    result = run_recipe(load_recipe(path), path, RunOptions(out=tmp / "run"), UI(quiet=True))
    row = result.report["stages"][-1]
    _, ctx = _context(tmp, CNN, DIGITS, {"type": "quantize"})
    x = torch.stack([ctx.data.val[i][0] for i in range(64)])
    return result.folder / row["folder"], x, row["accuracy"]


def _quantize(tmp_path, trained, stage, name="q"):
    """Run the stage on the trained model and save it: (result, saved folder, float reference module)."""
    from compresspipe.stages.quantize.stage import QuantizeStage

    folder, _, accuracy = trained
    cfg, ctx = _context(tmp_path, CNN, DIGITS, stage, accuracy)
    result = QuantizeStage(cfg).run(load_model(folder), ctx)
    save_model(result.state, tmp_path / name)
    return result, tmp_path / name, load_model(folder).module


def _size(folder):
    return sum((folder / f).stat().st_size for f in ("model.safetensors", "model.json"))


# method, dtype -> the smallest bytes ratio (float / quantized) the small model must reach
METHODS = [("static", "int8", 2.7), ("dynamic", "int8", 2.2), ("qat", "int8", 2.7), ("weight_only", "int8", 2.7),
           ("weight_only", "int4", 4.0), ("fp16", "int8", 1.7), ("bf16", "int8", 1.7)]


@pytest.mark.parametrize(("method", "dtype", "min_ratio"), METHODS)
def test_every_method_is_smaller_and_reloads_identically(tmp_path, trained, method, dtype, min_ratio):
    stage = {"type": "quantize", "method": method, "dtype": dtype, "calibration": {"batches": 2},
             "qat": {"epochs": 1}}
    result, folder, reference = _quantize(tmp_path, trained, stage)
    x = trained[1]
    assert result.kind == "quantized"
    assert _size(trained[0]) / _size(folder) >= min_ratio
    tensors = load_file(str(folder / "model.safetensors"))
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(method, torch.uint8 if dtype == "int4" else torch.int8)
    assert want in {t.dtype for t in tensors.values()}
    first, second = load_model(folder).module, load_model(folder).module
    with torch.no_grad():
        out = first(x)
        assert torch.equal(out, second(x))
        assert torch.equal(out, result.state.module(x))
        assert out.dtype == torch.float32
        # quantized predictions agree with the float model's on real digits
        agree = (out.argmax(1) == reference(x).argmax(1)).float().mean()
        assert agree >= (0.85 if dtype == "int4" or method == "qat" else 0.95)
    details = result.details
    assert details["bytes_per_param"]["after"] < details["bytes_per_param"]["before"] / min_ratio
    assert details["accuracy"]["change"] >= -0.05
    layers = {r["layer"]: r for r in details["tables"]["per layer"]}
    assert layers["fc1"]["quantized"] == "yes"
    if method == "dynamic":
        assert layers["c1"]["quantized"] == "no" and "Linear only" in layers["c1"]["reason"]
    else:
        assert layers["bn1"]["quantized"] == "folded"


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_static_and_dynamic(tmp_path, arch):
    from compresspipe.stages.quantize.stage import QuantizeStage

    spec = {"torchvision": arch, "kwargs": {"num_classes": 10}, "input_shape": [3, 16, 16]}
    # every forward at batch 8: the first pass at a new shape pays for building the CPU conv kernels
    data = {"dataset": "synthetic", "shape": [3, 16, 16], "samples": 40, "eval_batch_size": 8,
            "calibration_samples": 8}
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    built = build_model({"torchvision": arch, "kwargs": {"num_classes": 10}})
    with torch.no_grad():  # BatchNorm statistics of real activations, so signals do not vanish untrained
        built.train()(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
        float_out = built.eval()(x)
    for method in ("static", "dynamic"):
        model = copy.deepcopy(built)
        cfg, ctx = _context(tmp_path, spec, data, {"type": "quantize", "method": method, "calibration": {"batches": 1}},
                            accuracy=0.1)
        state = ModelState(model, {"torchvision": arch, "kwargs": {"num_classes": 10}}, (3, 16, 16), 10)
        result = QuantizeStage(cfg).run(state, ctx)
        save_model(result.state, tmp_path / method)
        reloaded = load_model(tmp_path / method).module
        with torch.no_grad():
            out = result.state.module(x)
            assert torch.equal(out, reloaded(x))
        rows = result.details["tables"]["per layer"]
        quantized = [r for r in rows if r["quantized"] == "yes"]
        if method == "static":
            assert len(quantized) > 20 and all("int8 static" in r["as"] for r in quantized)
            assert sum(r["quantized"] == "folded" for r in rows) > 15
            assert (out - float_out).norm() < 0.3 * float_out.norm()
        else:
            assert [r["layer"] for r in quantized] == [r["layer"] for r in rows if r["type"] == "Linear"]
            assert (out - float_out).abs().max() < 0.1 * float_out.abs().max() + 1e-3


def test_static_needs_calibration_and_sane_pairs(tmp_path):
    bad = [({"method": "static", "calibration": {"batches": 0}}, "needs calibration data"),
           ({"method": "static", "dtype": "int4"}, "dtype int4 needs method weight_only"),
           ({"method": "static", "backend": "torchao"}, "backend torchao cannot run method static"),
           ({"method": "fp16", "backend": "onnxruntime"}, "backend onnxruntime cannot run method fp16")]
    for options, message in bad:
        recipe = tiny_recipe(stages=[{"type": "quantize", **options}])
        with pytest.raises(RecipeError, match=message) as info:
            load_recipe(write_recipe(tmp_path, recipe))
        assert "stages[0]" in str(info.value)
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "quantize", "calibration": {"batches": 0}}]))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "calibration" in result.output


def test_no_quantizable_layer_is_exit_2(tmp_path):
    # include matches only BatchNorm / ReLU: nothing a quantizer can take
    recipe = tiny_recipe(model=CNN, evaluate=FAST,
                         stages=[{"type": "quantize", "method": "dynamic", "include": ["bn1", "relu1"]}])
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 2, result.output
    assert "leave no Linear layer" in result.output
    spec = {"torchvision": "resnet18", "kwargs": {"num_classes": 10}, "input_shape": [3, 8, 8]}
    data = {"dataset": "synthetic", "shape": [3, 8, 8], "samples": 8, "eval_batch_size": 4, "calibration_samples": 4}
    cfg, ctx = _context(tmp_path, spec, data, {"type": "quantize", "method": "static", "include": ["nope*"]})
    from compresspipe.stages.quantize.stage import QuantizeStage

    with pytest.raises(StageConfigError, match="selector 'nope\\*' matches no layer"):
        QuantizeStage(cfg).run(ModelState(build_model(spec), spec, (3, 8, 8), 10), ctx)


def test_onnxruntime_hands_quantization_to_export(tmp_path, trained):
    stage = {"type": "quantize", "method": "static", "backend": "onnxruntime", "calibration": {"batches": 3},
             "observer": "histogram"}
    result, folder, reference = _quantize(tmp_path, trained, stage)
    assert result.kind == "quantized" and _size(folder) == pytest.approx(_size(trained[0]), rel=0.05)
    assert torch.equal(load_model(folder).module(trained[1]), reference(trained[1]))  # still float
    record = result.state.records["quantize"]
    assert "export" not in result.details  # the hand-off travels on the model, not in the report
    assert record["onnx_int8"]["method"] == "static" and record["version"] == 1
    assert record["onnx_int8"]["calibration_batches"] == 3 and record["onnx_int8"]["observer"] == "histogram"
    assert record["float_stage"] == "train"
    assert load_model(folder).records == result.state.records  # saved in model.json


def test_torchao_weight_only_matches_torch_rounding():
    from compresspipe.stages.quantize.backends import BACKENDS

    ao = BACKENDS["torchao"]
    if ao.available() is not None:
        pytest.skip(ao.available())
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    for bits in (8, 4):
        q_ao, s_ao = ao.quantize_weight(w, bits, True)
        q, s = quantize_weight(w, bits, True)
        assert q_ao.dtype == torch.int8 and s_ao.shape == s.shape == (6,)
        # both round to the nearest level of their own (slightly different) scale
        assert torch.allclose(s_ao, s, rtol=0.08)  # torchao divides by 127.5 (7.5), torch by 127 (7)
        err = (q_ao.float() * s_ao.reshape(-1, 1, 1, 1) - w).abs()
        assert (err <= s_ao.reshape(-1, 1, 1, 1) / 2 + 1e-6).all()
    q4, _ = quantize_weight(w, 4, True)
    assert torch.equal(unpack_int4(pack_int4(q4), tuple(q4.shape)), q4)


def test_observers_and_per_tensor_change_the_result(tmp_path, trained):
    outs = {}
    for observer, per_channel in (("minmax", True), ("percentile", True), ("histogram", False)):
        stage = {"type": "quantize", "method": "static", "observer": observer, "per_channel": per_channel,
                 "calibration": {"batches": 2}, "percentile": 99.0}
        _, folder, _ = _quantize(tmp_path, trained, stage, name=observer)
        tensors = load_file(str(folder / "model.safetensors"))
        assert tensors["c2.weight_scale"].numel() == (16 if per_channel else 1)
        outs[observer] = (tensors["c2.output_scale"].item(), load_model(folder).module(trained[1]))
    assert outs["percentile"][0] < outs["minmax"][0]  # clipping the tails narrows the range
    assert not torch.equal(outs["minmax"][1], outs["histogram"][1])


def test_config_imports_without_torch():
    code = "import sys, compresspipe.stages.quantize as q; q.QuantizeConfig; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_recipe_runs_at_reduced_budget(tmp_path):
    recipe = Path(__file__).parents[2] / "recipes" / "quantize.yaml"
    result = runner.invoke(app, [
        "run", str(recipe), "--out", str(tmp_path / "q"), "-q", "--set", "data.max_samples=400",
        "--set", "stages.0.epochs=3", "--set", "stages.1.calibration.batches=2", "--set", "evaluate.latency.iters=1",
        "--set", "evaluate.latency.warmup=0", "--set", "gates.max_accuracy_drop=0.05",
        "--set", "model.kwargs={width: 8, hidden: 32}", "--set", "gates.min_size_reduction=2.5",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    quantized = report["stages"][-1]
    assert quantized["kind"] == "quantized" and quantized["vs_reference"]["size_reduction"] > 2.5


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_reference_path_matches_the_int8_kernels(tmp_path, trained, monkeypatch, method):
    """Off CPU and under torch.export/compile the layers run fake-quant float ops; they must agree."""
    _, folder, _ = _quantize(tmp_path, trained, {"type": "quantize", "method": method, "calibration": {"batches": 2}})
    model, x = load_model(folder).module, trained[1]
    with torch.no_grad():
        kernels = model(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        reference = model(x)
    assert (kernels.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    assert (kernels - reference).abs().max() < 0.05 * kernels.abs().max()


def test_fake_quant_matches_torch_and_passes_gradients_straight_through():
    from compresspipe.stages.quantize.layers import fake_quant

    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    scale, zero_point = torch.tensor(0.02), torch.tensor(10, dtype=torch.int32)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
    assert torch.equal(fake_quant(x.detach(), scale, zero_point), expected.detach())  # what exporters trace
    got = fake_quant(x, scale, zero_point)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    got.sum().backward()
    expected_grad = torch.autograd.grad(torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255).sum(),
                                        x)[0]
    assert torch.equal(x.grad, expected_grad) and 0 < int(x.grad.sum()) < x.numel()  # both values occur
