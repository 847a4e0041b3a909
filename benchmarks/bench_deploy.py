"""Deploy: the issue's performance claims, read from report.json as the product measures them.

Every figure is the shipped file's, in the deploy runtime (ONNX Runtime, one thread), from one run: size is
file bytes, accuracy is the runtime's on the whole validation split, a speedup is the median of the per-round
ratios reference / row, timed interleaved in one process, beside the interquartile range of those ratios.
The reference row is the trained float model (the `train` stage's model.onnx).

1. recipes/quickstart.yaml as it ships (deploy: onnxruntime, portable): its last row (export,
   model.int8.onnx) against the reference. Both files are then run again on an emulated AVX2-only CPU
   (`qemu-x86_64 -cpu Haswell`), where ONNX Runtime takes the u8s8 kernels that saturate with 8-bit weights:
   the portable (7-bit) file must keep its accuracy there too. A probe in the emulated process checks that
   it really runs that kernel path (8-bit products saturate); emulation is for correctness, never timing.
2. torchvision resnet18 at 3x224x224 on synthetic data: train, structured prune 50% with fine-tuning,
   static int8, export: the int8 file against the float reference's ONNX at batch 1 and 8. Its accuracy is
   measured natively only: emulating resnet18 at 224x224 over the validation split takes over 15 minutes.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import run_recipe_dict, stage

TITLE = "deploy: shipped files vs the trained float model's file in ONNX Runtime (report.json v2; targets beside)"

QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
REFERENCE = "train"
# the targets: the last row against the reference (points: Δaccuracy, on both CPUs)
QUICKSTART_TARGETS = {"size": 16.0, "b1": 3.0, "b64": 7.0, "points": -0.3}
RESNET_TARGETS = {"size": 14.0, "b1": 4.0}
# user-mode emulation runs a digits-cnn file over 359 images in seconds, but resnet18 at 224x224 for over 15 minutes
EMULATION_TIMEOUT_S = 300

# Run under qemu and natively: accuracy of ONNX files on the saved validation split, plus a probe that tells
# whether ONNX Runtime took the AVX2 (VPMADDUBSW, int16 pair sums) path: uint8 255 x int8 127 over K=64
# saturates there (exact: 255 * 127 * 64 = 2072640).
_SCRIPT = """
import json, sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

def session(model):
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

data = np.load(sys.argv[1]); x, y = data["x"], data["y"]
out = {"files": {}}
for path in sys.argv[2:]:
    sess = session(path); name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)]).argmax(1)
    out["files"][path] = int((pred == y).sum())
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                          [numpy_helper.from_array(np.full((64, 4), 127, np.int8), "w")])
probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]); probe.ir_version = 8
got = int(session(probe.SerializeToString()).run(None, {"a": np.full((4, 64), 255, np.uint8)})[0][0, 0])
out["saturates_8bit"] = got != 255 * 127 * 64
print(json.dumps(out))
"""


def qemu() -> str | None:
    """The user-mode emulator that can pose as an AVX2-only CPU, or None where there is none."""
    return shutil.which("qemu-x86_64") if platform.machine() == "x86_64" else None


def _row(case: str, check: str, value: float | str, iqr: str = "", target: str = "", met: str = "",
         detail: str = "") -> dict[str, Any]:
    return {"case": case, "check": check, "value": value, "IQR": iqr, "target": target, "met": met,
            "detail": detail}


def _met(ok: bool) -> str:
    return "yes" if ok else "MISSED"


def _ratio_rows(case: str, ref: dict[str, Any], last: dict[str, Any], targets: dict[str, float],
                batches: list[str]) -> list[dict[str, Any]]:
    vs = last["vs_reference"]
    size = vs["size_reduction"]
    rows = [_row(case, "size (reference bytes / file bytes)", size, target=f">= {targets['size']:g}x",
                 met=_met(size >= targets["size"]),
                 detail=f"{ref['bytes']} -> {last['bytes']} bytes ({Path(last['files'][0]).name})")]
    for b in batches:
        x = vs["speedup"][b]
        lo, hi = vs["speedup_iqr"][b]
        goal = targets.get(f"b{b}")
        rows.append(_row(case, f"speedup b{b} (one thread)", x, f"[{lo:.2f}, {hi:.2f}]",
                         f">= {goal:g}x" if goal else "", _met(x >= goal) if goal else "",
                         f"{ref['latency_ms'][b]:.4f} -> {last['latency_ms'][b]:.4f} ms"))
    rows.append(_row(case, "MACs (reference / row)", vs["mac_reduction"],
                     detail=f"{ref['macs']:,} -> {last['macs']:,} per sample"))
    return rows


def _validation_split(run_folder: Path) -> tuple[Any, Any]:
    """(x, y) of the run's validation split, rebuilt from its recipe exactly as the executor splits it."""
    import numpy as np

    from compresspipe.data.sources import load_data
    from compresspipe.recipe import load_recipe

    recipe = load_recipe(run_folder.parent / "recipe.yaml")
    shape = tuple(recipe.model.input_shape) if recipe.model.input_shape else None
    data = load_data(recipe.data, recipe.seed, shape)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in data.loader("val", recipe.data.eval_batch_size)], strict=True)
    return np.concatenate(xs).astype("float32"), np.concatenate(ys)


def _correct_counts(files: list[Path], x: Any, y: Any, tmp: Path, emulate: str | None) -> dict[str, Any]:
    import numpy as np

    (tmp / "count.py").write_text(_SCRIPT)
    np.savez(tmp / "val.npz", x=x, y=y)
    cmd = [sys.executable, str(tmp / "count.py"), str(tmp / "val.npz"), *map(str, files)]
    proc = subprocess.run(([emulate, "-cpu", "Haswell"] if emulate else []) + cmd, capture_output=True, text=True,
                          timeout=EMULATION_TIMEOUT_S if emulate else None, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _accuracy_rows(case: str, report: dict[str, Any], ref: dict[str, Any], last: dict[str, Any], tmp: Path,
                   floor: float | None, emulate: bool = True) -> list[dict[str, Any]]:
    """Δ accuracy here (the report's) and, with `emulate`, on an emulated AVX2-only CPU (both files rerun there)."""
    run = Path(report["run_folder"])
    x, y = _validation_split(run)
    n = len(y)
    target = "" if floor is None else f">= {floor:g}"

    def met(delta: float) -> str:
        return "" if floor is None else _met(delta >= floor - 1e-9)

    ref_ok, last_ok = round(ref["accuracy"] * n), round(last["accuracy"] * n)
    here = 100 * (last["accuracy"] - ref["accuracy"])
    before = [s for s in report["stages"] if s["index"] < last["index"] and s["format"] != last["format"]
              and s["index"] > ref["index"]]
    float_note = f"; {before[-1]['name']} row ({before[-1]['format']}): {round(before[-1]['accuracy'] * n)}/{n}" \
        if before else ""
    rows = [_row(case, "Δaccuracy points, this CPU", here, target=target, met=met(here),
                 detail=f"{last_ok}/{n} vs {ref_ok}/{n} images ({100 * ref['accuracy']:.2f}% reference{float_note})")]
    if not emulate:
        return rows
    files = [run / ref["files"][0], run / last["files"][0]]
    native = _correct_counts(files, x, y, tmp, None)["files"]
    if [native[str(f)] for f in files] != [ref_ok, last_ok]:  # the split rebuilt here is not the run's
        rows.append(_row(case, "Δaccuracy points, emulated AVX2-only CPU", "", met="n/a",
                         detail=f"validation split could not be rebuilt (native rerun {list(native.values())} "
                                f"images, report {[ref_ok, last_ok]})"))
        return rows
    emulator = qemu()
    if emulator is None:
        rows.append(_row(case, "Δaccuracy points, emulated AVX2-only CPU", "", target=target, met="n/a",
                         detail="n/a (qemu-x86_64 not installed)"))
        return rows
    t0 = time.perf_counter()
    try:
        emulated = _correct_counts(files, x, y, tmp, emulator)
    except (subprocess.SubprocessError, ValueError) as exc:  # timeout, crash or no JSON: say so, keep the rest
        rows.append(_row(case, "Δaccuracy points, emulated AVX2-only CPU", "", target=target, met="n/a",
                         detail=f"n/a (the emulated run failed: {type(exc).__name__}: {str(exc)[-200:]})"))
        return rows
    ref_q, last_q = (emulated["files"][str(f)] for f in files)
    delta = 100 * (last_q - ref_q) / n
    if not emulated["saturates_8bit"]:
        rows.append(_row(case, "Δaccuracy points, emulated AVX2-only CPU", delta, met="n/a",
                         detail="the emulated CPU did not take ONNX Runtime's AVX2 int8 path (8-bit probe exact): "
                                "not an AVX2-only figure"))
        return rows
    rows.append(_row(case, "Δaccuracy points, emulated AVX2-only CPU", delta, target=target, met=met(delta),
                     detail=f"qemu -cpu Haswell: {last_q}/{n} vs {ref_q}/{n} images (8-bit products saturate "
                            f"there; {time.perf_counter() - t0:.0f}s)"))
    return rows


def _machine_row(case: str, report: dict[str, Any]) -> dict[str, Any]:
    m = report["deploy"]["machine"]
    return _row(case, "CPU (timing and native accuracy)", "",
                detail=f"{m['cpu']} ({m['machine']}), int8 kernels: {m['target']}; ISA: {' '.join(m['isa'])}")


def quickstart_case(tmp: Path) -> list[dict[str, Any]]:
    recipe = yaml.safe_load(QUICKSTART.read_text())
    case = f"quickstart ({recipe['deploy']['runtime']}, {recipe['deploy']['cpu']})"
    (tmp / "quickstart").mkdir()
    t0 = time.perf_counter()
    report = run_recipe_dict(recipe, tmp / "quickstart")
    seconds = time.perf_counter() - t0
    ref, last = stage(report, REFERENCE), report["stages"][-1]
    rows = _ratio_rows(case, ref, last, QUICKSTART_TARGETS, [str(b) for b in report["deploy"]["batch_sizes"]])
    rows += _accuracy_rows(case, report, ref, last, tmp, QUICKSTART_TARGETS["points"])
    rows.append(_machine_row(case, report))
    rows.append(_row(case, "whole run (s)", seconds, detail=f"{len(report['stages'])} rows, last: {last['name']}"))
    return rows


def resnet18_recipe() -> dict[str, Any]:
    """resnet18 at ImageNet resolution on small synthetic data: enough to train, prune and calibrate.

    After removing half the channels one fine-tuning epoch leaves the model at 59% (from 100%); three recover it.
    """
    return {
        "compresspipe": 1, "name": "bench-deploy-resnet18-224", "seed": 0, "device": "cpu",
        "model": {"torchvision": "resnet18", "kwargs": {"num_classes": 10}, "input_shape": [3, 224, 224]},
        "data": {"dataset": "synthetic", "shape": [3, 224, 224], "samples": 512, "num_classes": 10, "noise": 1.0,
                 "batch_size": 32, "eval_batch_size": 16, "calibration_samples": 64},
        "evaluate": {"latency": {"batch_sizes": [1, 8], "warmup": 2, "iters": 5, "threads": 1}},
        "deploy": {"runtime": "onnxruntime", "cpu": "portable", "rounds": 15},  # a call is 5-40 ms: few per round
        "stages": [
            {"type": "train", "epochs": 2, "lr": 1.0e-3},
            {"type": "prune", "method": "structured", "amount": 0.5, "finetune": {"epochs": 3, "lr": 5.0e-4}},
            {"type": "quantize", "method": "static", "calibration": {"batches": 4}},
            {"type": "export", "formats": ["onnx", "onnx_int8"]},
        ],
    }


def resnet18_case(tmp: Path) -> list[dict[str, Any]]:
    case = "resnet18 3x224x224 (onnxruntime, portable)"
    (tmp / "resnet18").mkdir()
    t0 = time.perf_counter()
    report = run_recipe_dict(resnet18_recipe(), tmp / "resnet18")
    seconds = time.perf_counter() - t0
    ref, last = stage(report, REFERENCE), report["stages"][-1]
    rows = _ratio_rows(case, ref, last, RESNET_TARGETS, [str(b) for b in report["deploy"]["batch_sizes"]])
    rows += _accuracy_rows(case, report, ref, last, tmp, None, emulate=False)
    rows.append(_machine_row(case, report))
    rows.append(_row(case, "whole run (s)", seconds, detail="train 2 + prune (3 fine-tune epochs) + int8 + deploy"))
    return rows


def run() -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-deploy-"))
    try:
        return quickstart_case(tmp) + resnet18_case(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
