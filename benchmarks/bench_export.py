"""Export: int8 ONNX and ExecuTorch files against the float reference's ONNX, side by side in one run.

`compare_exports(recipe)` takes any recipe dict: it exports the reference (the model after the leading
train stages) right after those stages, runs the rest of the recipe (prune, distill, factorize, quantize,
...), and exports the result last. Every figure comes from the same run on the same machine:
size ratio vs the reference's float ONNX, accuracy in the runtime, and onnxruntime latency at batch 1
and 64 (one thread) timed here after the run, interleaved with the reference file so machine load hits
both alike: `sess.run` with a ready numpy feed (what a Python service calls) and, at batch 1, also with
pre-bound inputs (`io binding`, the runtime without the Python call's ~5 us). ExecuTorch (XNNPACK)
bytes and batch-1 latency, float and int8, come from the stage's own measurement.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import run_recipe_dict, stage

TITLE = "export: int8 files vs the float reference's onnx (sizes, onnxruntime/executorch latency, accuracy)"

REFERENCE_EXPORT = "export-reference"
FINAL_EXPORT = "export-final"
FORMATS = ["onnx", "onnx_int8", "executorch", "executorch_int8"]


def with_exports(recipe: dict[str, Any], formats: list[str] | None = None) -> dict[str, Any]:
    """The recipe plus an export of the reference (after the leading train stages) and one at the end."""
    out = copy.deepcopy(recipe)
    formats = formats or FORMATS
    stages = [s for s in out["stages"] if s.get("type") != "export"]
    lead = 0
    while lead < len(stages) and stages[lead].get("type") == "train":
        lead += 1
    reference = {"type": "export", "name": REFERENCE_EXPORT, "formats": [f for f in formats if "int8" not in f]}
    final = {"type": "export", "name": FINAL_EXPORT, "formats": formats}
    out["stages"] = stages[:lead] + [reference] + stages[lead:] + [final]
    out.setdefault("evaluate", {})["latency"] = {"batch_sizes": [1, 64], "warmup": 20, "iters": 300, "threads": 1}
    return out


def ort_paired(reference: Path, new: Path, shape: list[int], batch: int, bound: bool = False,
               rounds: int = 7, iters: int = 200) -> tuple[float, float]:
    """(reference ms, new ms): medians of per-round medians, rounds interleaved, one thread each."""
    import numpy as np
    import onnxruntime as ort

    def timer(path: Path) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype("float32")
        if bound:
            binding = sess.io_binding()
            binding.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x))
            binding.bind_output(sess.get_outputs()[0].name)
            return lambda: sess.run_with_iobinding(binding)
        feed = {"input": x}
        return lambda: sess.run(None, feed)

    def median_ms(call: Any) -> float:
        for _ in range(iters // 10):
            call()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    calls = timer(reference), timer(new)
    ref_ms, new_ms = [], []
    for _ in range(rounds):
        ref_ms.append(median_ms(calls[0]))
        new_ms.append(median_ms(calls[1]))
    return statistics.median(ref_ms), statistics.median(new_ms)


def compare_exports(recipe: dict[str, Any], case: str, formats: list[str] | None = None) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="cp-bench-export-"))
    report = run_recipe_dict(with_exports(recipe, formats), folder)
    ref = {r["format"]: r for r in stage(report, REFERENCE_EXPORT)["details"]["tables"]["exports"]}
    final = stage(report, FINAL_EXPORT)["details"]["tables"]["exports"]
    base = ref["onnx"]
    shape = list(recipe["model"]["input_shape"])
    exports = {s["name"]: folder / "run" / s["folder"] / "export" for s in report["stages"] if s["kind"] == "export"}
    reference_file = exports[REFERENCE_EXPORT] / "model.onnx"
    rows = []
    for label, table in (("reference", ref.values()), ("final", final)):
        for r in table:
            b1, b64, io = r.get("latency b1 ms"), r.get("latency b64 ms"), None
            base_b1, base_b64 = base["latency b1 ms"], base["latency b64 ms"]
            if r["format"].startswith("onnx"):
                path = exports[REFERENCE_EXPORT if label == "reference" else FINAL_EXPORT] / r["file"]
                base_b1, b1 = ort_paired(reference_file, path, shape, 1)
                base_io, b1_io = ort_paired(reference_file, path, shape, 1, bound=True)
                base_b64, b64 = ort_paired(reference_file, path, shape, 64, iters=30)
                io = base_io / b1_io
            rows.append({
                "case": f"{case}: {label}",
                "format": r["format"],
                "bytes": r["bytes"],
                "size vs ref onnx": base["bytes"] / r["bytes"],
                "lat b1 ms": b1,
                "speedup b1": None if b1 is None else base_b1 / b1,
                "speedup b1 io binding": io,
                "lat b64 ms": b64,
                "speedup b64": None if b64 is None else base_b64 / b64,
                "accuracy": r["accuracy"],
                "Δacc points": 100 * (r["accuracy"] - base["accuracy"]),
                "agreement": r["top1_agreement"],
            })
    return rows


def quickstart_recipe() -> dict[str, Any]:
    return yaml.safe_load((Path(__file__).parent.parent / "recipes" / "quickstart.yaml").read_text())


def resnet18_pruned_recipe() -> dict[str, Any]:
    return {
        "compresspipe": 1, "name": "resnet18-prune-export", "seed": 0, "device": "cpu",
        "model": {"torchvision": "resnet18", "kwargs": {"num_classes": 10}, "input_shape": [3, 32, 32]},
        "data": {"dataset": "synthetic", "shape": [3, 32, 32], "samples": 1024, "num_classes": 10, "noise": 1.0},
        "stages": [
            {"type": "train", "epochs": 2, "lr": 1.0e-3},
            {"type": "prune", "method": "structured", "amount": 0.5, "finetune": {"epochs": 3}},
        ],
    }


def run() -> list[dict[str, Any]]:
    # the full quickstart pipeline: train, prune, distill, quantize, then export
    rows = compare_exports(quickstart_recipe(), "quickstart pipeline", ["onnx", "onnx_int8", "executorch_int8"])
    trained = quickstart_recipe()
    trained["stages"] = [s for s in trained["stages"] if s["type"] == "train"]
    trained.pop("gates", None)
    rows += compare_exports(trained, "digits-cnn train only")
    rows += compare_exports(resnet18_pruned_recipe(), "resnet18 prune 50%", ["onnx", "onnx_int8"])
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_export [recipe.yaml]: any pipeline, side by side
    import sys

    given = [yaml.safe_load(Path(p).read_text()) for p in sys.argv[1:]]
    for row in [r for g in given for r in compare_exports(g, g["name"])] if given else run():
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
