"""deploy: every report row is the file that ships, int8 files are exact on the CPUs they target, and speed
figures carry their noise."""

from __future__ import annotations

import json
import os
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
from compresspipe.deploy.timing import interleaved, quartiles, ratio
from compresspipe.recipe.spec import Limits
from compresspipe.report.gates import judge
from compresspipe.runtimes import cpu
from compresspipe.runtimes.onnx_int8 import weight_abs_max
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


@pytest.mark.int8
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
        assert row["timed"] == "forward" and row["decode_tokens_per_s"] is None  # a classifier: one whole pass
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


@pytest.mark.int8
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


@pytest.fixture
def host_cpu(monkeypatch):
    """Sets the machine and instruction sets this process believes it runs on (both are cached per process)."""

    def clear() -> None:
        for fn in (cpu.host_isa, cpu.host_target):
            getattr(fn, "cache_clear", lambda: None)()

    def set_host(machine: str, isa: tuple[str, ...]) -> None:
        clear()
        monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
        monkeypatch.setattr(cpu, "host_isa", lambda: isa)

    yield set_host
    monkeypatch.undo()
    clear()


AVX2_ONLY = ("sse4_1", "avx", "avx2", "fma", "f16c")


@pytest.mark.parametrize("machine, isa, target", [
    ("x86_64", AVX2_ONLY, "x86-avx2"),
    ("x86_64", (*AVX2_ONLY, "avx512f", "avx512bw", "avx512_vnni"), "x86-vnni"),
    ("x86_64", (*AVX2_ONLY, "avx_vnni"), "x86-vnni"),
    ("x86_64", ("sse4_1",), "portable"),
    ("aarch64", ("asimd", "asimddp"), "arm64"),
])
def test_cpu_targets_resolve(host_cpu, machine, isa, target):
    """`cpu: auto` on each kind of machine, whatever machine runs the test."""
    host_cpu(machine, isa)
    assert cpu.WEIGHT_BITS == {"portable": 7, "x86-avx2": 7, "x86-vnni": 8, "arm64": 8}
    assert cpu.host_target() == cpu.resolve("auto") == target
    assert cpu.weight_bits("auto") == (8 if target in ("x86-vnni", "arm64") else 7)
    assert cpu.resolve("x86-avx2") == "x86-avx2" and cpu.resolve("portable") == "portable"
    assert cpu.machine_record()["target"] == target


# An AVX2-only CPU, emulated: ONNX Runtime picks its kernels from CPUID, so under `qemu-x86_64 -cpu Haswell` it runs
# the VPMADDUBSW path that saturates. The test set-up installs qemu-user where it can (Debian: apt). `make test-avx2`
# runs the int8 tests themselves under that CPU and says so in COMPRESSPIPE_EMULATED_CPU: no qemu inside qemu then.
# Every verdict compares a CPU with the file's exact arithmetic, computed in numpy, never with the host's kernels.
QEMU = shutil.which("qemu-x86_64")
ON_HASWELL = os.environ.get("COMPRESSPIPE_EMULATED_CPU") == "Haswell"
needs_avx2_cpu = pytest.mark.skipif(
    platform.machine() != "x86_64" or (QEMU is None and not ON_HASWELL),
    reason="qemu-user is not installed (apt-get install qemu-user), so no AVX2-only CPU to emulate")
_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
for path, inp, out in zip(*[iter(sys.argv[1:])] * 3):
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    np.save(out, sess.run(None, {sess.get_inputs()[0].name: np.load(inp)})[0])
"""


def _kernels(path: Path, x: np.ndarray) -> np.ndarray:
    """The file's outputs in ONNX Runtime's int8 kernels, on the CPU this process runs on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _on_avx2_cpu(runs: list[tuple[Path, np.ndarray]], tmp: Path) -> list[np.ndarray]:
    """Each file's outputs for its input in ONNX Runtime's int8 kernels on an AVX2-only CPU (Haswell, no VNNI), in
    one emulated process (starting one takes seconds)."""
    if ON_HASWELL:
        return [_kernels(path, x) for path, x in runs]
    args = []
    for i, (path, x) in enumerate(runs):
        np.save(tmp / f"x{i}.npy", x)
        args += [str(path), str(tmp / f"x{i}.npy"), str(tmp / f"y{i}.npy")]
    (tmp / "run.py").write_text(_SCRIPT)
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(tmp / "run.py"), *args], check=True,
                   capture_output=True, timeout=300)
    return [np.load(tmp / f"y{i}.npy") for i in range(len(runs))]


def _grid(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> tuple[np.ndarray, ...]:
    """scale and zero point shaped to broadcast along `axis` (per channel) or as scalars (per tensor)."""
    shape = [1] * x.ndim
    if scale.ndim:
        shape[axis % x.ndim] = -1
    zero = np.zeros((), np.float32) if zero_point is None else zero_point.astype(np.float32)
    return scale.astype(np.float32).reshape(shape), zero.reshape(shape if zero.ndim else ())


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The QDQ graph computed op by op in numpy by ONNX's reference evaluator (values on the uint8/int8 grids,
    dequantized, then float MatMul/Conv): the file's exact arithmetic, which no CPU's choice of int8 kernel changes.
    (De)QuantizeLinear are the ONNX definitions written out here: the reference implements them for opset >= 19
    only, and our files are older."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class QuantizeLinear(OpRun):
        op_domain = ""

        def _run(self, x, scale, zero_point=None, axis=1, **_):  # type: ignore[override]
            dtype = np.uint8 if zero_point is None else zero_point.dtype
            s, z = _grid(x, scale, zero_point, axis)
            info = np.iinfo(dtype)
            return (np.clip(np.rint(x / s) + z, info.min, info.max).astype(dtype),)

    class DequantizeLinear(OpRun):
        op_domain = ""

        def _run(self, x, scale, zero_point=None, axis=1, **_):  # type: ignore[override]
            s, z = _grid(x, scale, zero_point, axis)
            return (((x.astype(np.float32) - z) * s).astype(np.float32),)

    model = onnx.load(str(path))
    evaluator = ReferenceEvaluator(model, new_ops=[QuantizeLinear, DequantizeLinear])
    return evaluator.run(None, {model.graph.input[0].name: x})[0]


def _saturating_matmul(bits: int, path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """A QDQ MatMul built to saturate, as ONNX Runtime fuses it into QLinearMatMul: uint8 inputs near 255 times int8
    weights near the widest |w| of `bits`; the input, the file, and its exact result (the int32 sums, scaled and
    rounded to the output's uint8 grid, computed in numpy) with the output's step."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n, top = 32, 4, cpu.WEIGHT_LIMIT[bits]
    w_q = rng.integers(top - top // 4, top + 1, (k, n)).astype(np.int8)
    x_q = rng.integers(200, 256, (8, k)).astype(np.uint8)
    s_x, s_w = np.float32(1 / 255), np.float32(1 / 128)
    s_y = np.float32(255 * top * k * s_x * s_w / 255)  # the output grid holds the largest exact sum
    consts = {"s_x": s_x, "z": np.uint8(0), "w_q": w_q, "s_w": s_w, "s_y": s_y}
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_x", "z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_x", "z"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["w_dq"]),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "s_y", "z"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "s_y", "z"], ["logits"])]
    graph = helper.make_graph(nodes, "saturate", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    acc = x_q.astype(np.int64) @ w_q.astype(np.int64)  # what VNNI and ARM compute: int32 sums, no saturation
    exact = np.clip(np.round(acc * (s_x * s_w) / s_y), 0, 255) * s_y
    return x_q.astype(np.float32) * s_x, exact.astype(np.float32), float(s_y)


def test_the_saturating_matmul_reference_is_the_files_arithmetic(tmp_path):
    """The numpy reference of the saturating MatMul is what the file means: ONNX's reference evaluator agrees."""
    for bits in (7, 8):
        x, exact, step = _saturating_matmul(bits, tmp_path / f"q{bits}.onnx")
        assert np.abs(_reference(tmp_path / f"q{bits}.onnx", x) - exact).max() <= step  # one step of rounding


@pytest.mark.int8
@needs_avx2_cpu
def test_on_an_emulated_avx2_cpu_portable_files_stay_exact_and_8_bit_ones_saturate(tmp_path):
    """On an AVX2-only CPU a 7-bit file computes its exact result and an 8-bit one does not (which also proves the
    emulated CPU is AVX2-only: with VNNI both would be exact). Nothing here depends on the host's CPU."""
    paths = {bits: tmp_path / f"q{bits}.onnx" for bits in (7, 8)}
    built = {bits: _saturating_matmul(bits, path) for bits, path in paths.items()}  # input, exact result, step
    outputs = _on_avx2_cpu([(paths[bits], built[bits][0]) for bits in (7, 8)], tmp_path)
    errors = {bits: (float(np.abs(avx2 - built[bits][1]).max()), built[bits][2], float(np.abs(built[bits][1]).max()))
              for bits, avx2 in zip((7, 8), outputs, strict=True)}
    worst, step, _ = errors[7]
    assert worst <= step, errors  # 7-bit weights: exact up to one step of the output's rounding
    worst, step, top = errors[8]
    assert worst > 0.2 * top and worst > 10 * step, errors  # 8-bit weights: the int16 pair sums saturate


@pytest.mark.int8
@needs_avx2_cpu
def test_the_portable_export_agrees_on_an_emulated_avx2_cpu(tmp_path):
    """The file the export ships for `portable` computes its exact arithmetic on an AVX2-only CPU, and on this host
    whatever its CPU (AVX2-only, VNNI): both are checked against the numpy reference, not against each other."""
    path, _ = _export_int8(tmp_path, "portable")
    x = torch.rand((64, 1, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
    exact = _reference(path, x)
    bound = 1e-3 * max(1.0, float(np.abs(exact).max()))
    top2 = np.sort(exact, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * bound  # rows whose top class no error within the bound can change
    for cpu_name, kernels in (("avx2", _on_avx2_cpu([(path, x)], tmp_path)[0]), ("host", _kernels(path, x))):
        assert np.abs(exact - kernels).max() <= bound, cpu_name
        assert (exact.argmax(1) == kernels.argmax(1))[clear].all(), cpu_name


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
