"""deploy.fidelity: every shipped file follows the model it came from, or the run fails (exit 1) and says why."""

from __future__ import annotations

import json

import pytest

from tests.fixtures import run

pytest.importorskip("onnxruntime")

# A CNN that appends a constant channel of 1000 to its first layer's output and drops it again: float is unchanged,
# but an 8-bit grid over [0, 1000] rounds every informative channel to a few levels, so a fully int8 file cannot
# follow the float model.
OUTLIER_MODEL = '''
import torch
from torch import nn


class Outlier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.cat([x, x[:, :1] * 0 + 1000.0], 1)[:, :8]  # the constant channel widens the tensor's range
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def build():
    return Outlier()
'''


def _recipe(tmp_path, mixed_precision: bool) -> dict:
    (tmp_path / "outlier.py").write_text(OUTLIER_MODEL, encoding="utf-8")
    return {
        "compresspipe": 1, "name": "outlier", "seed": 0, "device": "cpu",
        "model": {"python": str(tmp_path / "outlier.py") + ":build", "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2, "max_samples": 900},
        "evaluate": {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 2, "threads": 1}},
        "deploy": {"runtime": "onnxruntime", "rounds": 3, "fidelity": {"mixed_precision": mixed_precision}},
        "stages": [{"type": "train", "epochs": 6, "lr": 3.0e-3},
                   {"type": "quantize", "method": "static", "calibration": {"batches": 4}}],
    }


@pytest.mark.int8
def test_an_int8_file_that_cannot_follow_its_float_model_fails_the_run_naming_the_diverging_layers(tmp_path):
    from compresspipe.errors import GateFailed

    recipe = _recipe(tmp_path, mixed_precision=False)
    recipe["stages"].append({"type": "export", "formats": ["onnx_int8"]})  # measures the same file again
    with pytest.raises(GateFailed) as info:
        run(tmp_path, recipe, allow_code=True)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    fidelity = [g for g in report["gates"] if g["scope"] == "deploy.fidelity"]
    assert fidelity and not fidelity[0]["passed"], fidelity
    row = report["stages"][-1]
    assert row["format"] == "onnx_int8" and row["fidelity"]["passed"] is False
    assert row["fidelity"]["agreement"] < 0.9
    # both rows name the layers where the int8 file diverges: the export row reads them from the file it wrote
    for stage_row in report["stages"][-2:]:
        assert stage_row["fidelity"]["diverging"], stage_row["name"]
    assert all("most diverging layers" in g["description"] for g in fidelity), fidelity
    assert "fidelity" in str(info.value)
    assert (tmp_path / "run" / "02-quantize" / "deploy" / "model.int8.onnx").is_file()  # every artifact kept
    # nothing recommends a file that does not follow its source
    assert report["recommendation"]["format"] != "onnx_int8"


@pytest.mark.int8
def test_automatic_mixed_precision_keeps_the_diverging_layers_float_until_the_file_follows(tmp_path):
    recipe = _recipe(tmp_path, mixed_precision=True)
    result = run(tmp_path, recipe, allow_code=True)
    row = result.report["stages"][-1]
    assert row["format"] == "onnx_int8"
    assert row["fidelity"]["passed"], row["fidelity"]
    assert row["fidelity"]["float_layers"], "some layers were kept float"
    assert row["fidelity"]["agreement"] >= 0.99
    assert any("kept float" in n for n in row["notes"])


def test_fidelity_judges_agreement_without_ties_and_not_for_a_model_that_has_not_learned():
    import torch

    from compresspipe.recipe.spec import FidelitySpec
    from compresspipe.runtimes.job import agreement, fidelity

    ref = torch.tensor([[2.0, 0.0], [1.0, 1.05], [0.0, 3.0]])
    out = torch.tensor([[2.0, 0.0], [1.1, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert agreement("classification", out, ref, labels) == (1, 3)
    assert agreement("classification", out, ref, labels, margin=0.1) == (1, 2)  # row 2 is a tie

    class Job:
        num_classes = 10
        fidelity = FidelitySpec()
        io = type("IO", (), {"task": "classification"})()

    good = {"source_agreement": 0.995, "source_accuracy": 0.9, "accuracy": 0.895, "samples": 400, "decided": 390,
            "top1_agreement": 0.9}
    assert fidelity(good, Job, int8=True)["passed"]
    bad = {**good, "source_agreement": 0.8}
    assert not fidelity(bad, Job, int8=True)["passed"]
    dropped = {**good, "accuracy": 0.85}
    assert "points below" in fidelity(dropped, Job, int8=True)["failures"][0]
    chance = {**bad, "source_accuracy": 0.12, "accuracy": 0.12}
    verdict = fidelity(chance, Job, int8=True)
    assert verdict["passed"] and not verdict["agreement_judged"]


def test_timm_batchnorm_with_activation_is_folded_and_keeps_its_activation():
    """timm's BatchNormAct2d (BatchNorm + activation in one layer) folds into the conv before it; the activation
    stays, so the folded model computes what the original did."""
    timm = pytest.importorskip("timm")
    import copy

    import torch

    from compresspipe.artifacts.edits import set_submodule
    from compresspipe.stages.graph import analyse, fold_bn, fold_target

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folds, _, error = analyse(model, True)
    assert error is None and len(folds) > 10, folds
    folded = copy.deepcopy(model)
    for conv, bn in folds.items():
        module = folded.get_submodule(bn)
        fold_bn(folded.get_submodule(conv), module)
        folded = set_submodule(folded, bn, fold_target(module))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4)


def _rows(int8_ms: float, float_ms: float, int8_passed: bool = True) -> tuple[list[dict], list[dict]]:
    def stage(name, kind, fmt, ms, size, passed=True):
        entry = {"files": [f"{name}/{fmt}"], "bytes": size, "latency_ms": {"1": ms, "32": ms * 10},
                 "fidelity": {"passed": passed}}
        return {"name": name, "kind": kind, "format": fmt, "formats": {fmt: entry}, **entry}

    stages = [stage("train", "weights", "onnx", 1.0, 4000), stage("prune", "structural", "onnx", float_ms, 2000),
              stage("quantize", "quantized", "onnx_int8", int8_ms, 500, int8_passed)]
    rows = [{"name": s["name"], "emulated": s["kind"] == "quantized"} for s in stages]
    return stages, rows


@pytest.mark.parametrize("int8_ms, float_ms, passed, ships", [
    (0.030, 0.043, True, "onnx_int8"),   # int8 pays: ship it
    (0.043, 0.030, True, "onnx"),        # int8 slower on this CPU (AVX2-only, tiny model): ship the float file
    (0.010, 0.030, False, "onnx"),       # int8 faster but does not follow its source: never shipped
    (0.0300, 0.0295, True, "onnx_int8"),  # within 5%: the smaller file
])
def test_the_recommended_file_is_the_fastest_that_follows_its_source(int8_ms, float_ms, passed, ships):
    from compresspipe.report.build import recommend

    stages, rows = _rows(int8_ms, float_ms, passed)
    rec = recommend(stages, rows)
    assert rec["format"] == ships, rec
    assert rec["batch"] == "1" and rec["reason"] and len(rec["candidates"]) == 2
    assert rec["stage"] == ("quantize" if ships == "onnx_int8" else "prune")


def _linear_onnx(path, gain: float) -> None:
    """logits = x @ W + sin(gain * x @ V): with a large gain, half an 8-bit step of input noise moves the logits."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 10)).astype(np.float32), "W")
    v = numpy_helper.from_array(rng.normal(size=(16, 10)).astype(np.float32) * gain, "V")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["x", "V"], ["b"]),
             helper.make_node("Sin", ["b"], ["c"]), helper.make_node("Mul", ["c", "amp"], ["d"]),
             helper.make_node("Add", ["a", "d"], ["logits"])]
    amp = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "amp")
    _save_graph(path, nodes, [w, v, amp])


def _save_graph(path, nodes, initializers, x_shape=("n", 16), out_shape=("n", 10)) -> None:
    """A float graph from input x to output logits, saved at `path`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("gain, unstable", [(0.0, False), (5000.0, True)])
def test_a_float_model_that_does_not_hold_its_predictions_under_input_rounding_is_named_as_the_cause(
        tmp_path, gain, unstable):
    """When no int8 file follows the source, the run says whether the source itself flips its top-1 under half an
    int8 step of input noise: then the cure is in the model, not in the quantizer."""
    from types import SimpleNamespace

    import onnx
    import torch

    from compresspipe.runtimes.onnx_int8 import _stability_note

    path = tmp_path / "m.onnx"
    _linear_onnx(path, gain)
    x = torch.rand(128, 16, generator=torch.Generator().manual_seed(0))
    job = SimpleNamespace(notes=[], fidelity=SimpleNamespace(min_agreement=0.99, tie_margin=0.1),
                          config=SimpleNamespace(dynamic_batch=True),
                          batches=[(x[i:i + 32], torch.zeros(32)) for i in range(0, 128, 32)])
    _stability_note(job, path, path, onnx.load(str(path)))
    notes = [n for n in job.notes if "float model itself" in n]
    assert bool(notes) == unstable, job.notes
    if unstable:
        assert "train longer" in notes[0] and "validation samples that are not ties" in notes[0]


def _shared_direction_onnx(path, common: float) -> None:
    """logits = x @ W with every class column `common` + small own weights: with a large common part, each
    column's int8 step is large against what tells the classes apart, so weight rounding flips the top-1."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (common + rng.normal(0.0, 1.0, (16, 10))).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["logits"], name="head/MatMul")
    _save_graph(path, [node], [numpy_helper.from_array(w, "W")])


@pytest.mark.parametrize("common, unstable", [(0.0, False), (200.0, True)])
def test_a_float_model_whose_top1_flips_under_weight_noise_of_int8_size_is_named_as_the_cause(
        tmp_path, common, unstable):
    """The weights' side of the stability check: each quantized weight moved randomly within half the step the
    int8 file gave it (what rounding does). A model that does not hold its top-1 under that cannot be followed by
    any int8 file on that grid: the run says so in a note and in the failed gate (fidelity.cause), not only which
    layers diverge. The check reads the steps from the int8 file itself (per channel)."""
    from types import SimpleNamespace

    import numpy as np
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compresspipe.runtimes.onnx_int8 import _stability_note, _weight_steps
    from compresspipe.stages.ship import unstable_cause

    source, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    _shared_direction_onnx(source, common)
    x = torch.rand(128, 16, generator=torch.Generator().manual_seed(0))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x[i:i + 32].numpy()} for i in range(0, 128, 32)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(source), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    graph = onnx.load(str(source))
    steps = _weight_steps(int8, graph)
    assert list(steps) == ["W"] and steps["W"].shape == (1, 10)  # one step per output column (axis 1)
    w = onnx.numpy_helper.to_array(graph.graph.initializer[0])
    assert np.allclose(steps["W"][0], np.abs(w).max(0) / 127, rtol=1e-5)
    job = SimpleNamespace(notes=[], stability=None, fidelity=SimpleNamespace(min_agreement=0.99, tie_margin=0.1),
                          config=SimpleNamespace(dynamic_batch=True),
                          batches=[(x[i:i + 32], torch.zeros(32)) for i in range(0, 128, 32)])
    _stability_note(job, source, int8, graph)
    assert job.stability is not None and set(job.stability) >= {"weights", "samples", "min_agreement"}
    assert (job.stability["weights"] < 0.99) == unstable, job.stability
    notes = [n for n in job.notes if "float model itself" in n]
    assert bool(notes) == unstable, job.notes
    cause = unstable_cause(job.stability)
    assert bool(cause) == unstable
    if unstable:
        assert "randomly within half its int8 step" in notes[0] and "train longer" in notes[0]
        assert "random weight noise of int8 rounding's size" in cause and "ship the float file" in cause


def test_the_stability_check_leaves_outputs_without_one_class_axis_alone(tmp_path):
    """Per-token or per-pixel outputs have their own class axis: top-1 over a flattened row would mean nothing,
    so the check says nothing about them rather than blame the model."""
    from types import SimpleNamespace

    import numpy as np
    import onnx
    import torch
    from onnx import helper, numpy_helper

    from compresspipe.runtimes.onnx_int8 import _stability_note

    w = (200.0 + np.random.default_rng(0).normal(0.0, 1.0, (16, 10))).astype(np.float32)
    path = tmp_path / "m.onnx"
    _save_graph(path, [helper.make_node("MatMul", ["x", "W"], ["logits"], name="head/MatMul")],
                [numpy_helper.from_array(w, "W")], ("n", 4, 16), ("n", 4, 10))
    x = torch.rand(64, 4, 16, generator=torch.Generator().manual_seed(0))
    job = SimpleNamespace(notes=[], stability=None, fidelity=SimpleNamespace(min_agreement=0.99, tie_margin=0.1),
                          config=SimpleNamespace(dynamic_batch=True), batches=[(x, torch.zeros(64))])
    _stability_note(job, path, path, onnx.load(str(path)))
    assert job.stability is None and not job.notes


def test_a_failed_gate_names_the_unstable_float_model_in_its_message():
    """fidelity.cause reaches the gate's description (terminal, report.md, HTML, JUnit), before the layers."""
    from compresspipe.report.gates import fidelity_gates

    fid = {"source": "float model", "agreement": 0.96, "drop": 0.005, "min_agreement": 0.99, "max_drop": 0.01,
           "passed": False, "failures": ["top-1 agreement with its float source 0.9600 < 0.99"],
           "cause": "the float model itself keeps only 0.9500 under random weight noise of int8 rounding's size",
           "diverging": [{"layer": "layers.2", "cause": "Relu"}]}
    report = {"stages": [{"name": "quantize", "formats": {"onnx_int8": {"fidelity": fid}}}]}
    (gate,) = fidelity_gates(report)
    text = gate["description"]
    assert not gate["passed"]
    assert text.index("the float model itself") < text.index("most diverging layers")


def _chain_graph(n: int):
    """n Conv nodes in a chain, named n0 .. n{n-1}: what _fit needs of a float graph."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Conv", [f"t{i}", f"w{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1])])
    return helper.make_model(graph)


def test_mixed_precision_ships_the_try_that_follows_best_not_the_last(tmp_path, monkeypatch):
    """Float layers do not add up: when keeping more of them float makes the file worse, the file written at
    the end is the best try (here one layer float), and the note lists every try."""
    from types import SimpleNamespace

    from compresspipe.recipe.spec import FidelitySpec
    from compresspipe.runtimes import onnx_int8

    graph = _chain_graph(8)
    written: list[list[str]] = []
    score = {0: 0.960, 1: 0.975, 2: 0.950, 4: 0.940}  # agreement by how many layers stay float

    def quantize(exclude, only=None, seven_bit=None):
        written.append(list(only) if only is not None else list(exclude))

    def measure(job, path):
        agreement = score[len(written[-1])]
        return {"passed": agreement >= 0.99, "agreement": agreement}

    ranked = [{"node": f"n{i}", "layer": f"n{i}", "op": "Conv", "sqnr_db": 10.0 + i, "lost_db": 1.0, "cause": "x"}
              for i in range(8)]
    monkeypatch.setattr(onnx_int8, "_measure", measure)
    monkeypatch.setattr(onnx_int8, "_diverging", lambda *a: ranked)
    monkeypatch.setattr(onnx_int8, "_impact", lambda job, p, o, g, nodes, q, e: {n: -i for i, n in enumerate(nodes)})
    monkeypatch.setattr(onnx_int8, "set_metadata", lambda path, meta: None)
    job = SimpleNamespace(fidelity=FidelitySpec(), notes=[], diagnosis=None, float_layers=None)
    written.append([])  # the all-int8 file the export wrote first
    passed = onnx_int8._fit(job, tmp_path / "p.onnx", tmp_path / "o.onnx", [], quantize, graph,
                            {"method": "percentile", "extra": {}})
    assert passed is False
    assert written[-1] == ["n0"], written  # the best try is what `out` holds at the end
    assert job.float_layers == ["n0"]
    note = next(n for n in job.notes if "kept float" in n)
    assert "0.9600 -> 0.9750" in note and "tried: 0 float 0.9600, 1 float 0.9750, 2 float 0.9500" in note


def test_a_7_bit_file_that_fails_says_what_8_bit_weights_reach_and_is_kept(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from compresspipe.runtimes import onnx_int8

    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"seven")
    calls = []

    def quantize(exclude, only=None, seven_bit=None):
        calls.append(seven_bit)
        out.write_bytes(b"eight")

    monkeypatch.setattr(onnx_int8, "_measure", lambda job, path: {"passed": path.read_bytes() == b"eight",
                                                                  "agreement": 0.9944})
    job = SimpleNamespace(notes=[], cpu="portable")
    onnx_int8._eight_bit_note(job, out, ["small_conv"], quantize)
    assert calls == [False]
    assert out.read_bytes() == b"seven"  # the file that ships is the 7-bit one the recipe asked for
    assert "8-bit weights instead of deploy.cpu portable's 7" in job.notes[0]
    assert "0.9944 and passes deploy.fidelity" in job.notes[0]


def test_float_outputs_drops_the_pair_and_the_scale_it_read(tmp_path):
    """The logits leave the last layer in float: the Q/DQ pair goes, and so do its scale and zero point (ONNX
    Runtime warns at every load about initializers nothing reads)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compresspipe.runtimes.onnx_int8 import float_outputs

    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W"),
             numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s"),
             numpy_helper.from_array(np.array(128, dtype=np.uint8), "z")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("QuantizeLinear", ["y", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert float_outputs(path) == 1
    kept = onnx.load(str(path))
    assert [n.op_type for n in kept.graph.node] == ["MatMul"]
    assert [t.name for t in kept.graph.initializer] == ["W"]
    x = np.arange(4, dtype=np.float32).reshape(1, 4) * 0.37
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(out, x)  # exact float logits, no 8-bit rounding


def test_the_diagnosis_an_int8_file_records_reads_back_and_bad_metadata_reads_as_none(tmp_path):
    """diagnosis_of reads what a failed file recorded (the export row reports it); a file from elsewhere with a
    malformed value reads as no diagnosis, not as an error."""
    import json

    from compresspipe.runtimes.onnx_float import set_metadata
    from compresspipe.runtimes.onnx_int8 import DIAGNOSIS_KEY, diagnosis_of

    path = tmp_path / "m.onnx"
    _linear_onnx(path, 0.0)
    assert diagnosis_of(path) == {}
    recorded = {"diverging": [{"layer": "c1", "cause": "saturation"}], "stability": {"weights": 0.95}}
    set_metadata(path, {DIAGNOSIS_KEY: json.dumps(recorded)})
    assert diagnosis_of(path) == recorded
    set_metadata(path, {DIAGNOSIS_KEY: "{not json"})
    assert diagnosis_of(path) == {}


def test_a_batchnorm_after_a_channel_concat_of_convolutions_folds_into_them(tmp_path):
    """MixNet's mixed convolution: split, one conv per part, concat, BatchNorm. ONNX Runtime folds only a BatchNorm
    right after one conv, so the int8 file ran this one on 8-bit inputs and outputs. fold_bn_through_concat folds
    it into the convs (with and without a bias); the graph computes the same function. A concat that something
    else reads too keeps its BatchNorm."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from compresspipe.runtimes.onnx_int8 import fold_bn_through_concat

    rng = np.random.default_rng(0)

    def t(name, *shape, low=-1.0, high=1.0):
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    inits = [t("w1", 3, 4, 3, 3), t("b1", 3), t("w2", 5, 4, 1, 1), t("gamma", 8, low=0.5, high=2.0), t("beta", 8),
             t("mean", 8), t("var", 8, low=0.5, high=2.0)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="mix/conv1"),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="mix/conv2"),
             helper.make_node("Concat", ["c1", "c2"], ["cat"], axis=1, name="mix/cat"),
             helper.make_node("BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["logits"], name="bn")]
    path = tmp_path / "m.onnx"
    _save_graph(path, nodes, inits, ("n", 4, 6, 6), ("n", 8, 6, 6))
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert fold_bn_through_concat(path) == 1
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-5 * max(1.0, float(np.abs(want).max()))

    # the concat is also read elsewhere: folding would change that reader, so the BatchNorm stays
    nodes.append(helper.make_node("Identity", ["cat"], ["also"], name="reader"))
    _save_graph(path, nodes, inits, ("n", 4, 6, 6), ("n", 8, 6, 6))
    assert fold_bn_through_concat(path) == 0
