"""quantize: every method gives a smaller artifact that reloads without pickle to identical outputs."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.cli import app
from compresspipe.errors import RecipeError, StageConfigError
from compresspipe.models.factory import build_model
from compresspipe.recipe import load_recipe
from compresspipe.run.executor import RunOptions, run_recipe
from compresspipe.stages.context import StageRecord
from compresspipe.stages.quantize.layers import pack_int4, quantize_weight, unpack_int4
from compresspipe.ui import UI
from tests.fixtures import CNN, stage_context, tiny_recipe, write_recipe

runner = CliRunner()
FAST = {"latency": {"batch_sizes": [4], "warmup": 0, "iters": 1, "threads": 1}}


DIGITS = {"dataset": "digits", "batch_size": 64, "max_samples": 400, "eval_batch_size": 64}


def _context(tmp_path, model_spec, data, stage, accuracy=None):
    """A stage context as the executor builds it; `accuracy`: the previous stage's, as its metrics say."""
    recipe = tiny_recipe(model=model_spec, data=data, evaluate=FAST, stages=[stage])
    parsed, ctx = stage_context(tmp_path, recipe, "quantize",
                                history={"train": StageRecord(0, "train", "train", tmp_path, {})},
                                input_metrics={"accuracy": accuracy})
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
    assert details["emulated"] is (method not in ("fp16", "bf16"))  # int8/int4 in PyTorch: a float emulation
    if method in ("static", "dynamic", "qat"):
        assert any("float emulation" in n and "onnx_int8" in n for n in result.notes), result.notes
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
    from compresspipe.stages.quantize import QuantizeRecord

    record = result.state.get(QuantizeRecord)
    assert "export" not in result.details  # the hand-off travels on the model, not in the report
    assert record.onnx_int8.method == "static" and record.method == "static"
    assert record.onnx_int8.calibration_batches == 3 and record.onnx_int8.observer == "histogram"
    assert record.float_stage is None  # the model stayed float: the export quantizes it as it stands
    assert load_model(folder).get(QuantizeRecord) == record  # saved in model.json, read back typed
    assert json.loads((folder / "model.json").read_text())["records"]["quantize"]["version"] == 3
    assert result.details["emulated"] is False  # nothing quantized in PyTorch
    # version 1 (before keep_float) still reads, with no layer kept float
    from compresspipe.artifacts.records import record_from_json

    old = json.loads((folder / "model.json").read_text())["records"]["quantize"]
    old["version"] = 1
    del old["onnx_int8"]["keep_float"]
    assert record_from_json("quantize", old).onnx_int8.keep_float == []


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


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_traced_forward_matches_eager(tmp_path, trained, monkeypatch, method):
    """While torch.export/compile traces, the weight is dequantized from the int buffers, not the cache."""
    _, folder, _ = _quantize(tmp_path, trained, {"type": "quantize", "method": method, "calibration": {"batches": 2}})
    model, x = load_model(folder).module, trained[1]
    with torch.no_grad():
        eager = model(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        traced = model(x)
    assert torch.equal(eager, traced)


def _layers(mode: str, bits: int = 8, per_channel: bool = True, relu: bool = False):
    """A QuantLinear and a QuantConv2d (dynamic: Linear only, as the stage does) from seeded float layers."""
    from compresspipe.stages.quantize.layers import QuantConv2d, QuantLinear, act_qparams

    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(24, 10), torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    inputs = {"linear": torch.randn(5, 24) * 2, "conv": torch.randn(5, 4, 7, 7)}
    built = {"linear": QuantLinear.from_float(linear, mode, bits, per_channel, relu)}
    if mode != "dynamic":
        built["conv"] = QuantConv2d.from_float(conv, mode, bits, per_channel, relu)
    if mode == "static":
        for name, float_layer in (("linear", linear), ("conv", conv)):
            x = inputs[name]
            y = float_layer(x).detach()
            built[name].set_activation_ranges(act_qparams(x.min(), x.max()),
                                              act_qparams(0 if relu else y.min(), y.max()))
    return built, inputs


CASES = [("static", 8, True, False), ("static", 8, False, True), ("dynamic", 8, True, True),
         ("dynamic", 8, False, False), ("weight_only", 8, True, False), ("weight_only", 4, True, False),
         ("weight_only", 4, False, False)]


@pytest.mark.parametrize(("mode", "bits", "per_channel", "relu"), CASES)
def test_layer_state_dict_round_trip_gives_identical_outputs(tmp_path, mode, bits, per_channel, relu):
    """The saved format is unchanged: the same buffers, dtypes and spec as the int8-kernel layers wrote."""
    from safetensors.torch import save_file

    from compresspipe.stages.quantize.layers import build_layer, layer_spec

    built, inputs = _layers(mode, bits, per_channel, relu)
    for name, layer in built.items():
        spec = json.loads(json.dumps(layer_spec(layer)))  # as model.json holds it
        assert {k: spec[k] for k in ("mode", "bits", "per_channel", "relu", "bias")} == {
            "mode": mode, "bits": bits, "per_channel": per_channel, "relu": relu, "bias": True}
        state = layer.state_dict()
        keys = {"qweight", "weight_scale", "fbias"} | (
            {"input_scale", "output_scale", "input_zero_point", "output_zero_point"} if mode == "static" else set())
        assert set(state) == keys
        assert state["qweight"].dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert state["weight_scale"].shape == ((layer.weight_shape[0],) if per_channel else (1,))
        if mode == "static":
            assert state["input_zero_point"].dtype == torch.int32 and state["input_scale"].dtype == torch.float32
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
        reloaded = build_layer(spec)
        reloaded.load_state_dict(load_file(str(tmp_path / f"{name}.safetensors")), strict=True)
        x = inputs[name]
        with torch.no_grad():
            first = layer(x)
            assert torch.equal(first, reloaded(x)) and torch.equal(first, layer(x))  # cached weight: same again
            assert first.dtype == torch.float32 and first.shape == reloaded(x).shape


@pytest.mark.parametrize(("mode", "relu"), [("static", False), ("static", True), ("dynamic", False)])
def test_emulation_is_the_int8_arithmetic(mode, relu):
    """Float ops compute what integer kernels do: int8 x uint8 products summed exactly, then scaled."""
    from compresspipe.stages.quantize.layers import ACT_CLAMP, dynamic_qparams

    built, inputs = _layers(mode, relu=relu)
    layer, x = built["linear"], inputs["linear"]
    if mode == "static":
        scale, zero_point = layer.input_scale, layer.input_zero_point
    else:
        scale, zero_point = dynamic_qparams(x)
    xq = (torch.clamp(torch.round(x / scale) + zero_point, 0, ACT_CLAMP) - zero_point).to(torch.int64)
    acc = xq @ layer.qweight.to(torch.int64).T  # exact integer sums
    expected = acc.double() * float(scale) * layer.weight_scale.double() + layer.fbias.double()
    if relu:
        expected = expected.clamp(min=0)
    if mode == "static":
        s, z = float(layer.output_scale), int(layer.output_zero_point)
        expected = (torch.clamp(torch.round(expected / s) + z, 0, ACT_CLAMP) - z) * s
    with torch.no_grad():
        got = layer(x).double()
    if mode == "static":  # on the output grid: equal, but for a float sum landing on the other side of a .5
        step = float(layer.output_scale)
        assert ((got - expected).abs() > 1e-5).float().mean() < 0.02
        assert (got - expected).abs().max() <= step * 1.001
    else:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_quantizes_each_batch_over_its_own_range():
    from compresspipe.stages.quantize.layers import ACT_QMAX, DYNAMIC_MIN_SCALE, dynamic_qparams

    x = torch.tensor([[-1.0, 0.5], [3.0, 0.0]])
    scale, zero_point = dynamic_qparams(x)
    assert float(scale) == pytest.approx(4.0 / ACT_QMAX) and int(zero_point) == round(1.0 / (4.0 / ACT_QMAX))
    scale, zero_point = dynamic_qparams(torch.rand(3, 4) + 1)  # positive: the range still starts at zero
    assert int(zero_point) == 0
    scale, zero_point = dynamic_qparams(torch.zeros(2, 3))
    assert float(scale) == pytest.approx(DYNAMIC_MIN_SCALE) and int(zero_point) == 0
    built, _ = _layers("dynamic")
    with torch.no_grad():
        assert torch.equal(built["linear"](torch.zeros(2, 24)), built["linear"].fbias.expand(2, -1))


def test_dequantized_weight_cache_follows_the_buffers():
    import copy

    built, inputs = _layers("static")
    layer, x = built["conv"], inputs["conv"]
    with torch.inference_mode():
        before = layer(x)  # the cache is built here, yet must not be an inference tensor
    assert layer._dequantized is not None and not layer._dequantized.is_inference()
    assert copy.deepcopy(layer)._dequantized is None  # never copied (nor saved: it is no buffer)
    assert "_dequantized" not in layer.state_dict()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.set_weight(torch.ones(layer.weight_shape, dtype=torch.int8), torch.full((6,), 0.01), torch.zeros(6))
    with torch.no_grad():
        changed = layer(x)
        assert not torch.equal(changed, before)
        layer.load_state_dict(state)
        assert torch.equal(layer(x), before)
        assert layer.to(torch.float64)(x.double()).dtype == torch.float64  # moved: rebuilt in the new dtype
    x = x.clone().requires_grad_()
    layer.float()(x).sum().backward()  # gradients reach the input (fake-quant's straight-through mask)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_histogram_observer_clips_an_outlier_deterministically():
    from compresspipe.runtimes.observers import RangeObserver
    from compresspipe.stages.quantize.layers import ACT_QMAX

    generator = torch.Generator().manual_seed(0)
    # L2-optimal: clipping the value at 1000 to hi costs (1000 - hi)^2, the grid costs each of the million others
    # ((hi - lo) / 127)^2 / 12; the sum is least near hi = 160 (min/max keeps 1000, coarsening every step 6x)
    batches = [torch.randn(250_000, generator=generator) for _ in range(4)]
    batches[2][7] = 1000.0

    def observe(kind: str) -> RangeObserver:
        observer = RangeObserver(kind, 99.99)
        for batch in batches:
            observer.update(batch)
        return observer

    histogram, minmax = observe("histogram"), observe("minmax")
    scale, zero_point = histogram.qparams()
    lo, hi = -zero_point * scale, (ACT_QMAX - zero_point) * scale
    assert 120 < hi < 200 and -5 < lo < -2, (lo, hi)
    assert minmax.qparams()[0] > 1000 / ACT_QMAX  # min/max keeps the outlier
    assert observe("histogram").qparams() == (scale, zero_point)  # deterministic
    # without outliers the range keeps nearly all of the data
    plain = RangeObserver("histogram", 99.99)
    plain.update(torch.rand(10_000, generator=generator) * 6)
    scale, zero_point = plain.qparams()
    assert zero_point == 0 and 5.5 < scale * ACT_QMAX <= 6.0 + 1e-6


def test_histogram_keeps_counts_when_the_range_widens():
    from compresspipe.runtimes.observers import Histogram

    h = Histogram(bins=100)
    h.add(torch.linspace(0, 1, 1001))
    h.add(torch.linspace(-1, 3, 1001))
    assert (h.lo, h.hi) == (-1.0, 3.0)
    assert float(h.counts.sum()) == pytest.approx(2002)
    # the first batch's mass stays in [0, 1]: the bins over [0, 1] hold it plus their share of the second
    in_unit = h.counts[25:50].sum()
    assert float(in_unit) == pytest.approx(1001 + 250, abs=15)
    h.add(torch.zeros(10))  # inside the range: no rebinning
    assert float(h.counts.sum()) == pytest.approx(2012)


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


# the quantize path in a fresh process (torch warns about quantized tensors once per process), then its reload
_NO_DEPRECATED_PATH = r'''
import json, sys, warnings
from pathlib import Path

import torch

from compresspipe.data.sources import load_data
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.stages.context import StageContext
from compresspipe.ui import UI
from compresspipe.models.factory import build_model
from compresspipe.recipe import load_recipe
from compresspipe.stages.quantize.stage import QuantizeStage
from tests.fixtures import CNN, stage_context, tiny_recipe, write_recipe

tmp = Path(sys.argv[1])
spec = {"builtin": "digits-cnn", "kwargs": {"width": 8, "hidden": 32}, "input_shape": [1, 8, 8]}
data = {"dataset": "synthetic", "shape": [1, 8, 8], "samples": 96, "eval_batch_size": 16, "calibration_samples": 32}
stages = [{"method": "static"}, {"method": "static", "observer": "histogram"}, {"method": "dynamic"},
          {"method": "qat", "qat": {"epochs": 1}}, {"method": "weight_only"}]
x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i, options in enumerate(stages):
        folder = tmp / str(i)
        folder.mkdir()
        stage = {"type": "quantize", "calibration": {"batches": 2}, **options}
        recipe, ctx = stage_context(folder, tiny_recipe(model=spec, data=data, stages=[stage]), "quantize")
        torch.manual_seed(0)
        state = ModelState(build_model(spec), spec, (1, 8, 8), 10)
        result = QuantizeStage(recipe.stages[0]).run(state, ctx)
        save_model(result.state, folder / "model")
        with torch.no_grad():
            load_model(folder / "model").module(x)
print(json.dumps([{"file": w.filename, "line": w.lineno, "category": w.category.__name__, "message": str(w.message)}
                  for w in caught]))
'''


def test_quantize_and_reload_emit_no_torch_quantization_deprecation(tmp_path):
    """torch 2.14 deprecates torch.ao.quantization, quantized tensors and torch.ops.quantized: none may run."""
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _NO_DEPRECATED_PATH, str(tmp_path)], capture_output=True,
                          text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    caught = json.loads(done.stdout.strip().splitlines()[-1])
    bad = [w for w in caught if "/torch/ao/" in w["file"].replace(os.sep, "/")
           or re.search(r"torch\.ao|quantized tensor|quint8|qint8|torch\.ops\.quantized", w["message"])]
    assert not bad, "deprecated torch quantization used:\n" + "\n".join(
        f"{w['file']}:{w['line']}: {w['category']}: {w['message'][:300]}" for w in bad)


def test_qat_weights_reach_the_int8_onnx_file(tmp_path, trained):
    """After QAT the int8 runtimes quantize the trained weights (dequantized), not the float model before QAT."""
    from compresspipe.stages.export.stage import float_source
    from compresspipe.stages.quantize import QuantizeRecord
    from compresspipe.stages.quantize.layers import dequantized

    result, folder, _ = _quantize(tmp_path, trained, {"type": "quantize", "method": "qat", "calibration": {"batches": 2},
                                                       "qat": {"epochs": 1}})
    record = result.state.get(QuantizeRecord)
    assert record.method == "qat" and record.float_stage is None
    _, ctx = _context(tmp_path / "ctx", CNN, DIGITS, {"type": "export", "formats": ["onnx_int8"]})
    source, handoff = float_source(result.state, ["onnx_int8"], ctx)
    assert handoff is not None and source is not None
    x = trained[1]
    with torch.no_grad():  # the float copy computes the int layers' weights in float: close to the emulation
        assert (source(x).argmax(1) == result.state.module(x).argmax(1)).float().mean() > 0.95
    fc2 = result.state.module.fc2
    assert torch.equal(dequantized(result.state.module).fc2.weight, fc2.weight())


def test_int4_hands_the_file_its_grouped_linear_layers_and_says_convolutions_stay_float_there(tmp_path, trained):
    """weight_only int4 on a CNN: Linear layers go to the onnx_int4 file in 4-bit groups; the convolutions (4-bit
    per-channel in PyTorch) stay float in that file, and the stage says so instead of leaving it to be found."""
    from compresspipe.stages.quantize import QuantizeRecord
    from compresspipe.stages.quantize.nbits import QuantMatMulNBits

    result, _, _ = _quantize(tmp_path, trained, {"type": "quantize", "method": "weight_only", "dtype": "int4"})
    grouped = [n for n, m in result.state.module.named_modules() if isinstance(m, QuantMatMulNBits)]
    record = result.state.get(QuantizeRecord)
    assert grouped and record.onnx_int4 is not None and record.onnx_int4.layers == grouped
    assert any("convolution(s) hold 4-bit per-channel weights in PyTorch" in n for n in result.notes), result.notes
