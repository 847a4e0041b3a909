"""Quantization: method x backend -> artifact size, PyTorch latency and accuracy against the float32 model.

digits-cnn and digits-mlp are trained once (a recipe run); each method/backend pair then quantizes a fresh
copy of the trained model through the stage itself, saves it (model.safetensors + model.json) and reloads it,
so sizes are real artifact bytes and the model timed is the reloaded one. Latency interleaves the float and
quantized models over several rounds (CPU, 1 thread, median), so load from other processes hits both alike.

In PyTorch the int8/int4 layers are a float emulation of the int8 file (its exact rounding in float ops):
their accuracy is the deployed model's, their PyTorch latency is no speedup (a ratio below 1 is the cost of
the emulation). The int8 speed is measured in the deploy runtime by benchmarks/bench_export.py (onnx_int8,
executorch_int8). The targets here are size and accuracy; the table is what the package docstring of
compresspipe.stages.quantize reports.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from benchmarks.bench_prune import paired_speedup
from benchmarks.common import run_recipe_dict, stage

TITLE = ("quantize: method x backend vs the float32 model (size x > 1 is better; int8 in PyTorch is a float "
         "emulation: its speed is in bench_export)")

TRAIN: dict[str, Any] = {"type": "train", "epochs": 15, "lr": 1.0e-3}


def _recipe(name: str, builtin: str) -> dict[str, Any]:
    return {
        "compresspipe": 1, "name": f"bench-quantize-{name}", "seed": 0, "device": "cpu",
        "model": {"builtin": builtin, "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2},
        "evaluate": {"latency": {"enabled": False}},
        "stages": [TRAIN],
    }


# (model, method, dtype, backend)
CASES: list[tuple[str, str, str, str]] = [
    ("digits-cnn", "static", "int8", "torch"),
    ("digits-cnn", "qat", "int8", "torch"),
    ("digits-cnn", "dynamic", "int8", "torch"),
    ("digits-cnn", "weight_only", "int8", "torch"),
    ("digits-cnn", "weight_only", "int8", "torchao"),
    ("digits-cnn", "weight_only", "int4", "torch"),
    ("digits-cnn", "fp16", "-", "torch"),
    ("digits-cnn", "bf16", "-", "torch"),
    ("digits-cnn", "static", "int8", "onnxruntime"),
    ("digits-mlp", "dynamic", "int8", "torch"),
    ("digits-mlp", "static", "int8", "torch"),
    ("digits-mlp", "weight_only", "int8", "torch"),
]
# (model, method, backend) -> (smallest size ratio, smallest accuracy change in points or None)
TARGETS = {("digits-cnn", "static", "torch"): (3.5, -0.5), ("digits-mlp", "dynamic", "torch"): (3.5, None)}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name in ("model.safetensors", "model.json"))


def _case(trained: Path, report: dict[str, Any], tmp: Path, model: str, method: str, dtype: str,
          backend: str) -> dict[str, Any]:
    import torch

    from compresspipe.artifacts.model import load_model, save_model
    from compresspipe.data.sources import load_data
    from compresspipe.metrics import evaluate
    from compresspipe.recipe import load_recipe
    from compresspipe.stages.context import StageContext, StageRecord
    from compresspipe.stages.quantize import QuantizeConfig
    from compresspipe.stages.quantize.stage import QuantizeStage
    from compresspipe.ui import UI

    spec: dict[str, Any] = {"type": "quantize", "method": method, "backend": backend,
                            "calibration": {"batches": 16}, "qat": {"epochs": 2}}
    if dtype != "-":
        spec["dtype"] = dtype
    recipe = {**_recipe("case", model), "stages": [spec]}
    folder = tmp / f"{model}-{method}-{dtype}-{backend}"
    folder.mkdir(parents=True)
    import yaml

    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    parsed = load_recipe(folder / "recipe.yaml")
    data = load_data(parsed.data, 0, (1, 8, 8))
    train_row = stage(report, "train")
    ctx = StageContext(recipe=parsed, index=2, name="quantize", stage_dir=folder, device=torch.device("cpu"), seed=2,
                       data=data, ui=UI(quiet=True),
                       history={"train": StageRecord(1, "train", "train", trained, train_row)})
    result = QuantizeStage(cast(QuantizeConfig, parsed.stages[0])).run(load_model(trained), ctx)
    save_model(result.state, folder / "model")
    quantized = load_model(folder / "model").module
    reference = load_model(trained).module
    val = data.loader("val", 256)
    acc_ref, acc = evaluate(reference, val, "cpu")[0], evaluate(quantized, val, "cpu")[0]
    ms_ref64, ms64, x64 = paired_speedup(reference, quantized, (1, 8, 8), 64)
    _, _, x1 = paired_speedup(reference, quantized, (1, 8, 8), 1, rounds=5, iters=60)
    pytorch = ("float32 (quantized at export)" if backend == "onnxruntime" else
               f"{method} cast" if method in ("fp16", "bf16") else f"float emulation of {dtype}")
    row = {"case": model, "method": method, "dtype": dtype, "backend": backend, "in pytorch": pytorch,
           "size x": _bytes(trained) / _bytes(folder / "model"),
           "bytes/param": result.details.get("bytes_per_param", {}).get("after", 4.0),
           "ms b64 ref": ms_ref64, "ms b64": ms64, "latency x b64": x64, "latency x b1": x1,
           "acc ref": acc_ref, "Δacc pts": round(100 * (acc - acc_ref), 2)}
    target = TARGETS.get((model, method, backend))
    if target is not None:
        size, drop = target
        ok = row["size x"] >= size and (drop is None or row["Δacc pts"] >= drop)
        row["target"] = f"{'met' if ok else 'MISSED'}: size>={size}x" + (f" Δacc>={drop}" if drop is not None else "")
    else:
        row["target"] = "quantized at export (onnx_int8)" if backend == "onnxruntime" else ""
    return row


def run() -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-quantize-"))
    try:
        trained: dict[str, tuple[Path, dict[str, Any]]] = {}
        for model in ("digits-cnn", "digits-mlp"):
            (tmp / model).mkdir(parents=True)
            report = run_recipe_dict(_recipe(model, model), tmp / model)
            trained[model] = (Path(report["run_folder"]) / stage(report, "train")["folder"], report)
        return [_case(*trained[m], tmp / "cases", m, method, dtype, backend) for m, method, dtype, backend in CASES]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
