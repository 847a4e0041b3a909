"""deploy: every report row is the file that ships, int8 files are exact on the CPUs they target, and speed
figures carry their noise."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.deploy import cpu
from compresspipe.deploy.timing import interleaved, quartiles, ratio
from compresspipe.recipe.spec import Limits
from compresspipe.report.gates import judge
from compresspipe.stages.export.onnx_int8 import weight_abs_max
from compresspipe.stages.export.stage import ExportStage
from tests.fixtures import digits_cnn_recipe, tiny_recipe, trained_cnn, write_recipe
from tests.stages.test_export import _ctx, _export_cfg

runner = CliRunner()
CNN = {"builtin": "digits-cnn", "input_shape": [1, 8, 8]}  # full width: pruning and int8 both pay


def _run(tmp_path: Path, recipe: dict, *args: str):
    path = write_recipe(tmp_path, recipe)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "-q", *args],
                           catch_exceptions=False)
    report_file = tmp_path / "run" / "report.json"
    return result, (json.loads(report_file.read_text()) if report_file.exists() else None)


def test_prune_then_export_is_judged_on_the_int8_file(tmp_path):
    """A size gate sees model.int8.onnx, not the PyTorch model; `format:` picks another file of the stage."""
    recipe = tiny_recipe(
        model=CNN, data={"dataset": "digits", "max_samples": 700, "eval_batch_size": 64},
        evaluate={"latency": {"batch_sizes": [1, 16], "warmup": 1, "iters": 3}},
        stages=[{"type": "train", "epochs": 3, "lr": 5e-3},
                {"type": "prune", "method": "structured", "amount": 0.5},
                {"type": "export", "formats": ["onnx", "onnx_int8"], "verify": {"batches": 1, "min_agreement": 0.8},
                 "expect": {"format": "onnx", "min_size_reduction": 3}}],
        gates={"min_size_reduction": 10},
    )
    result, report = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert report["version"] == 2 and report["deploy"]["runtime"] == "onnxruntime"  # auto: the export's runtime
    rows = {s["name"]: s for s in report["stages"]}
    export, train = rows["export"], rows["train"]
    assert train["format"] == "onnx" and rows["prune"]["format"] == "onnx"
    assert export["format"] == "onnx_int8" and export["files"] == ["03-export/export/model.int8.onnx"]
    assert export["bytes"] == (tmp_path / "run" / export["files"][0]).stat().st_size
    assert export["vs_reference"]["size_reduction"] >= 10
    assert export["torch"]["bytes"] > 2 * export["bytes"]  # the PyTorch figure is secondary, and larger
    # the float file of the same stage, measured because a gate names it, is far larger
    onnx = export["formats"]["onnx"]
    assert 3 <= onnx["vs_reference"]["size_reduction"] < 10
    gates = {(g["scope"], g["gate"]): g for g in report["gates"]}
    assert gates[("gates", "min_size_reduction")]["format"] == "onnx_int8"
    assert gates[("stages.export.expect", "min_size_reduction")]["format"] == "onnx"
    # every row's shipped file is on disk, in the stage folder, covered by the manifest, and timed
    for row in report["stages"]:
        folder = tmp_path / "run" / row["folder"]
        manifest = json.loads((folder / "manifest.json").read_text())["files"]
        for file in row["files"]:
            assert Path(file).relative_to(row["folder"]).as_posix() in manifest
        assert set(row["latency_ms"]) == {"1", "16"}
        lo, hi = row["latency_iqr_ms"]["1"]
        assert lo <= row["latency_ms"]["1"] <= hi
        assert 0 <= row["accuracy"] <= 1 and row["agreement"] >= 0.8
    assert "model.int8.onnx" in (tmp_path / "run" / "report.md").read_text()


def _export_int8(tmp_path: Path, cpu_target: str) -> tuple[Path, dict]:
    recipe = digits_cnn_recipe()
    recipe["deploy"] = {"cpu": cpu_target}
    (tmp_path / cpu_target).mkdir()
    ctx = _ctx(tmp_path / cpu_target, recipe)
    result = ExportStage(_export_cfg(formats=["onnx_int8"], verify={"batches": 2, "min_agreement": 0.9})).run(
        trained_cnn(), ctx)
    folder = ctx.stage_dir / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / "model.int8.onnx", {"entry": manifest["files"][0], "notes": result.notes}


def test_portable_int8_weights_cannot_saturate_avx2_kernels(tmp_path):
    """The property that makes a file exact on every CPU, checked on the file itself (whatever CPU runs the test)."""
    path, info = _export_int8(tmp_path, "portable")
    widest = weight_abs_max(path)
    assert widest is not None and widest <= 64
    assert cpu.saturation_bound(widest) <= cpu.INT16_MAX  # 255 * 64 * 2 = 32640
    record = info["entry"]["int8"]
    assert record["cpu_target"] == "portable" and record["weight_bits"] == 7 and record["weight_abs_max"] == widest
    assert record["correct_on"].startswith("every CPU")
    assert record["verified_on"]["machine"] == platform.machine() and "isa" in record["verified_on"]
    assert not any("correct only on" in n for n in info["notes"])

    full, info = _export_int8(tmp_path, "x86-vnni")
    assert weight_abs_max(full) > 64  # full 8-bit weights: the bound no longer holds
    assert cpu.saturation_bound(weight_abs_max(full)) > cpu.INT16_MAX
    assert any("correct only on CPUs with VNNI" in n for n in info["notes"])


def test_cpu_targets_resolve():
    assert cpu.WEIGHT_BITS == {"portable": 7, "x86-avx2": 7, "x86-vnni": 8, "arm64": 8}
    assert cpu.resolve("auto") == cpu.host_target() in ("portable", "x86-avx2", "x86-vnni", "arm64")
    assert cpu.resolve("x86-avx2") == "x86-avx2"


# An AVX2-only CPU, emulated: ONNX Runtime picks its kernels from CPUID, so under `qemu -cpu Haswell` it runs
# the VPMADDUBSW path that saturates. The test set-up installs qemu-user where it can (Debian: apt).
QEMU = shutil.which("qemu-x86_64")
_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
if sys.argv[4] == "exact":  # no fusion: Quantize/DequantizeLinear then float MatMul, the same on every CPU
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
np.save(sys.argv[3], sess.run(None, {sess.get_inputs()[0].name: np.load(sys.argv[2])})[0])
"""


def _logits(path: Path, x: np.ndarray, tmp: Path, emulate: bool, exact: bool = False) -> np.ndarray:
    """The file's outputs: in ONNX Runtime's int8 kernels natively or on an emulated AVX2-only CPU (Haswell), or
    `exact`: the QDQ graph computed unfused (dequantized values, float MatMul), the int32-exact result that no
    CPU's kernel choice changes. Tests compare the emulated CPU with the exact result, never with the host."""
    script, inp, out = tmp / "run.py", tmp / "x.npy", tmp / f"y{int(emulate)}{int(exact)}.npy"
    script.write_text(_SCRIPT)
    np.save(inp, x)
    cmd = [sys.executable, str(script), str(path), str(inp), str(out), "exact" if exact else "kernels"]
    subprocess.run(([QEMU, "-cpu", "Haswell"] if emulate else []) + cmd, check=True, capture_output=True,
                   timeout=300)
    return np.load(out)


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="qemu-user is not installed (apt-get install qemu-user), so no AVX2-only CPU to emulate")
def test_on_an_emulated_avx2_cpu_portable_files_stay_exact_and_8_bit_ones_saturate(tmp_path):
    """A model built to saturate: one Linear with large positive weights over inputs at the top of their range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, (64, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(w, "w")])
    source = tmp_path / "f.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    x = rng.uniform(0.9, 1.0, (8, 64)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x}])

        def get_next(self):
            return next(self.items, None)

    results = {}
    for bits in (7, 8):
        path = tmp_path / f"q{bits}.onnx"
        quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=bits == 7)
        exact, emulated = _logits(path, x, tmp_path, False, exact=True), _logits(path, x, tmp_path, True)
        results[bits] = float(np.abs(exact - emulated).max() / np.abs(exact).max())
    # the verdict depends on the emulated CPU and the file only, never on the host's instruction sets
    assert results[7] < 1e-3, results  # 7-bit weights: exact on an AVX2-only CPU
    assert results[8] > 0.05, results  # 8-bit weights: an AVX2-only CPU's int16 pair sums saturate


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="qemu-user is not installed (apt-get install qemu-user), so no AVX2-only CPU to emulate")
def test_the_portable_export_agrees_on_an_emulated_avx2_cpu(tmp_path):
    path, _ = _export_int8(tmp_path, "portable")
    x = torch.rand((64, 1, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
    exact, emulated = _logits(path, x, tmp_path, False, exact=True), _logits(path, x, tmp_path, True)
    native = _logits(path, x, tmp_path, False)
    for kernels in (native, emulated):  # the host's kernels and an AVX2-only CPU's agree with the exact result
        assert (exact.argmax(1) == kernels.argmax(1)).all()
        assert np.abs(exact - kernels).max() <= 1e-3 * max(1.0, float(np.abs(exact).max()))


# -- recipe validation ------------------------------------------------------------------------------------------


def test_bad_deploy_values_are_exit_2_at_their_line(tmp_path):
    recipe = tiny_recipe(deploy={"runtime": "tflite", "cpu": "x86", "rounds": 1})
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, recipe))])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "deploy.runtime: must be one of: auto, torch, onnxruntime, executorch (got 'tflite')" in out
    assert "deploy.cpu: must be one of: auto, portable, x86-avx2, x86-vnni, arm64 (got 'x86')" in out
    assert "deploy.rounds" in out and "recipe.yaml:" in out and "Traceback" not in out


def test_a_runtime_that_is_not_installed_is_exit_2(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    path = write_recipe(tmp_path, tiny_recipe(deploy={"runtime": "executorch"},
                                              gates={"format": "onnx_int8", "min_accuracy": 0.1}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "deploy.runtime: runtime executorch needs executorch, which is not installed" in out
    assert "recipe.yaml:" in out
    bad = write_recipe(tmp_path, tiny_recipe(gates={"format": "executorch", "min_accuracy": 0.1}), "gate.yaml")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "gates.format: format executorch cannot be measured here" in \
        " ".join(result.output.split())


# -- timing with a noise bound ----------------------------------------------------------------------------------


def test_interleaved_rounds_take_turns_and_ratios_carry_their_spread(monkeypatch):
    import compresspipe.deploy.timing as timing

    clock = [0.0]
    order: list[str] = []

    def make(name: str, seconds: float):
        def call() -> None:
            order.append(name)
            clock[0] += seconds
        return call

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    samples = interleaved({"ref": make("ref", 0.004), "new": make("new", 0.001)}, rounds=4, warmup=1, max_iters=3)
    assert [len(v) for v in samples.values()] == [4, 4]
    assert samples["ref"] == pytest.approx([4.0] * 4) and samples["new"] == pytest.approx([1.0] * 4)
    timed = order[4:]  # after warm-up and one probe call each
    assert timed[:3] == ["ref"] * 3 and timed[3:6] == ["new"] * 3 and timed[6:9] == ["new"] * 3  # order rotates
    assert ratio(samples["ref"], samples["new"]) == pytest.approx((4.0, 4.0, 4.0))
    assert quartiles([1.0, 2.0, 3.0, 4.0, 100.0]) == (2.0, 3.0, 4.0)


def _row(speedup: float, iqr: list[float]) -> dict:
    vs = {"accuracy_delta": 0.0, "param_reduction": 1.0, "size_reduction": 1.0, "mac_reduction": 1.0,
          "speedup": {"1": speedup}, "speedup_iqr": {"1": iqr}}
    return {"name": "q", "format": "onnx_int8", "accuracy": 0.9, "sparsity": 0.0, "vs_reference": vs, "formats": {}}


def test_a_speed_gate_inside_the_noise_is_flagged_for_remeasurement():
    limits = Limits(min_speedup=2.0)
    clear = judge(limits, _row(3.0, [2.8, 3.2]), 1, "gates")[0]
    assert clear["passed"] and "within_noise" not in clear and clear["interval"] == [2.8, 3.2]
    noisy = judge(limits, _row(2.1, [1.9, 2.3]), 1, "gates")[0]
    assert noisy["within_noise"] and noisy["passed"] and "judged on the median" not in noisy["description"]
    judged = judge(limits, _row(1.95, [1.9, 2.3]), 1, "gates", remeasured=True)[0]
    assert judged["within_noise"] and not judged["passed"] and "judged on the median" in judged["description"]
    missing = judge(Limits(min_speedup=2.0, format="onnx"), _row(3.0, [2.8, 3.2]), 1, "gates")[0]
    assert missing["value"] is None and not missing["passed"]  # a format that was not measured fails loudly
