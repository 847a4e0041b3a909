"""Export: int8 ONNX and ExecuTorch files against the float reference's ONNX, side by side in one run.

`compare_exports(recipe)` takes any recipe dict: it exports the reference (the model after the leading
train stages) right after those stages, runs the rest of the recipe (prune, distill, factorize, quantize,
...), and exports the result last. Every figure comes from the same run on the same machine:
size ratio vs the reference's float ONNX, onnxruntime latency at batch 1 and 64 (one thread), accuracy
in the runtime, and ExecuTorch (XNNPACK) bytes and batch-1 latency, float and int8.
"""

from __future__ import annotations

import copy
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
    out.setdefault("evaluate", {})["latency"] = {"batch_sizes": [1, 64], "warmup": 5, "iters": 30, "threads": 1}
    return out


def compare_exports(recipe: dict[str, Any], case: str, formats: list[str] | None = None) -> list[dict[str, Any]]:
    report = run_recipe_dict(with_exports(recipe, formats))
    ref = {r["format"]: r for r in stage(report, REFERENCE_EXPORT)["details"]["tables"]["exports"]}
    final = stage(report, FINAL_EXPORT)["details"]["tables"]["exports"]
    base = ref["onnx"]
    rows = []
    for label, table in (("reference", ref.values()), ("final", final)):
        for r in table:
            b1, b64 = r.get("latency b1 ms"), r.get("latency b64 ms")
            rows.append({
                "case": f"{case}: {label}",
                "format": r["format"],
                "bytes": r["bytes"],
                "size vs ref onnx": base["bytes"] / r["bytes"],
                "lat b1 ms": b1,
                "speedup b1": None if b1 is None else base["latency b1 ms"] / b1,
                "lat b64 ms": b64,
                "speedup b64": None if b64 is None else base["latency b64 ms"] / b64,
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
            {"type": "prune", "method": "structured", "amount": 0.5, "finetune": {"epochs": 1}},
        ],
    }


def run() -> list[dict[str, Any]]:
    # the full quickstart pipeline: train, prune, distill, factorize, quantize, then export
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
