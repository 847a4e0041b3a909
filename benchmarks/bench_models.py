"""Models users bring: a Hugging Face BERT-style classifier and a timm model, compressed by their example recipes,
each against its own float ONNX, in ONNX Runtime.

- BERT-style (BertForSequenceClassification from a config: 4 layers, hidden 256, 4 heads, sequence 64) trained
  on synthetic-text (4 classes): half its heads and MLP width pruned while distilling from the trained model,
  dynamic int8, exported to ONNX (dynamic batch and sequence). Targets: >= 6x smaller, >= 3x faster at batch 1
  and 32, within 1 point of top-1.
- timm resnet18 (32x32 images) through prune -> quantize (static int8) -> export. Target: >= 2x faster at
  batch 1, within 1 point.

Every figure is the report's own: the final row's file (model.int8.onnx) against the reference row's float
model.onnx (the trained model), sizes in bytes, latency timed in ONNX Runtime interleaved with the reference in
the same process (one thread), speedups the median of the per-round ratios with their interquartile range.
`python -m benchmarks models`: about 6 minutes on 2 idle cores (AMD EPYC Zen 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import run_recipe_dict, stage

TITLE = "models: BERT-style (Hugging Face) and timm resnet18, compressed vs their own float ONNX in ONNX Runtime"
RECIPES = Path(__file__).parent.parent / "recipes"
# case -> (recipe, changes, targets: min size reduction, min speedup per batch size, max top-1 drop in points)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "bert-4x256 prune+distill+int8": (
        "huggingface_text.yaml", {"deploy": {"runtime": "onnxruntime", "rounds": 9}},
        {"size": 6.0, "speedup": {"1": 3.0, "32": 3.0}, "drop_points": 1.0},
    ),
    "timm resnet18 prune+quantize+export": (
        "timm.yaml", {"deploy": {"runtime": "onnxruntime", "rounds": 9}},
        {"size": None, "speedup": {"1": 2.0}, "drop_points": 1.0},
    ),
}


def run() -> list[dict[str, Any]]:
    rows = []
    for case, (name, changes, targets) in CASES.items():
        recipe = yaml.safe_load((RECIPES / name).read_text())
        recipe.update(changes)
        recipe["gates"] = None  # the benchmark reports its own verdicts
        report = run_recipe_dict(recipe)
        ref = stage(report, report["reference"])
        final = report["stages"][-1]
        vs = final["vs_reference"]
        drop = 100 * (ref["accuracy"] - final["accuracy"])
        row: dict[str, Any] = {
            "case": case, "file": final["files"][0].split("/")[-1], "reference MB": ref["bytes"] / 1e6,
            "MB": final["bytes"] / 1e6, "size x": vs["size_reduction"],
        }
        for bs in ("1", "32"):
            row[f"speedup b{bs}"] = vs["speedup"].get(bs)
            iqr = vs["speedup_iqr"].get(bs)
            row[f"b{bs} iqr"] = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else ""
        row.update({"ref top1": ref["accuracy"], "top1": final["accuracy"], "drop pts": drop})
        misses = []
        if targets["size"] is not None and vs["size_reduction"] < targets["size"]:
            misses.append(f"size {vs['size_reduction']:.2f}x < {targets['size']}x")
        for bs, limit in targets["speedup"].items():
            got = vs["speedup"].get(bs)
            if got is None or got < limit:
                misses.append(f"b{bs} {got if got is None else round(got, 2)}x < {limit}x")
        if drop > targets["drop_points"]:
            misses.append(f"drop {drop:.2f} > {targets['drop_points']} pts")
        row["check"] = "pass" if not misses else "MISS: " + "; ".join(misses)
        rows.append(row)
    return rows
