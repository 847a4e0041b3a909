"""Pruning: structured pruning must make models smaller and faster; magnitude pruning must say it does not.

Each row compares a pruned model with its unpruned reference from the same run. Latency is timed here,
interleaving the two models over several rounds (CPU, 1 thread, median), so that load from other
processes hits both alike.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import run_recipe_dict, stage

TITLE = "prune: structured vs magnitude, pruned model vs its reference (ratios > 1 are better)"

DIGITS: dict[str, Any] = {
    "compresspipe": 1, "name": "bench-prune-digits", "seed": 0, "device": "cpu",
    "model": {"builtin": "digits-cnn", "input_shape": [1, 8, 8]},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2},
    "evaluate": {"latency": {"enabled": False}},
    "stages": [{"type": "train", "epochs": 15, "lr": 1.0e-3}],
}


def paired_speedup(reference: Any, new: Any, shape: tuple[int, ...], batch: int, rounds: int = 7,
                   iters: int = 40) -> tuple[float, float, float]:
    return common.paired_latency(reference, new, shape, batch, rounds, iters, warmup=5)


def _folder(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir(parents=True, exist_ok=True)
    return tmp / name


def _models(report: dict[str, Any], ref: str, name: str) -> tuple[Any, Any]:
    from compresspipe.artifacts.model import load_model

    folder = Path(report["run_folder"])
    return (load_model(folder / stage(report, ref)["folder"]).module,
            load_model(folder / stage(report, name)["folder"]).module)


def _row(case: str, report: dict[str, Any], ref: str, name: str, batch: int, shape: tuple[int, ...]) -> dict[str, Any]:
    a, b = stage(report, ref), stage(report, name)
    reference, pruned = _models(report, ref, name)
    ref_ms, new_ms, speedup = paired_speedup(reference, pruned, shape, batch)
    return {
        "case": case, "kind": b["kind"], "acc ref": a["accuracy"], "acc": b["accuracy"],
        "Δacc pts": round(100 * (b["accuracy"] - a["accuracy"]), 2), "params x": a["params"] / b["params"],
        "MACs x": a["macs"] / b["macs"], "sparsity": b["sparsity"], "batch": batch, "ms ref": ref_ms,
        "ms": new_ms, "speedup": speedup,
    }


def _verdict(ok: bool, what: str) -> str:
    return f"{'met' if ok else 'MISSED'}: {what}"


def digits_structured(tmp: Path) -> dict[str, Any]:
    recipe = {**DIGITS, "stages": [*DIGITS["stages"], {
        "type": "prune", "name": "prune", "method": "structured", "amount": 0.5, "importance": "l2", "steps": 2,
        "finetune": {"epochs": 10, "lr": 5.0e-4, "distill": "baseline"},
    }]}
    report = run_recipe_dict(recipe, _folder(tmp, "digits-structured"))
    row = _row("digits-cnn structured 50%", report, "train", "prune", 64, (1, 8, 8))
    row["target"] = _verdict(row["Δacc pts"] >= -0.5 and row["MACs x"] >= 3 and row["speedup"] >= 2,
                             "Δacc>=-0.5 MACs>=3x b64>=2x")
    return row


def digits_magnitude(tmp: Path) -> dict[str, Any]:
    recipe = {**DIGITS, "name": "bench-prune-magnitude", "stages": [*DIGITS["stages"], {
        "type": "prune", "name": "prune", "method": "magnitude", "amount": 0.75, "finetune": {"epochs": 5},
    }]}
    report = run_recipe_dict(recipe, _folder(tmp, "digits-magnitude"))
    row = _row("digits-cnn magnitude 75%", report, "train", "prune", 64, (1, 8, 8))
    noted = any(n.startswith("mask-only") for n in stage(report, "prune")["notes"])
    row["target"] = _verdict(row["kind"] == "mask-only" and noted and 0.8 <= row["speedup"] <= 1.25,
                             "mask-only noted, speedup~1")
    return row


def resnet18_structured(tmp: Path) -> dict[str, Any]:
    import torch

    recipe = {
        "compresspipe": 1, "name": "bench-prune-resnet18", "seed": 0, "device": "cpu",
        "model": {"torchvision": "resnet18", "kwargs": {"num_classes": 10}, "input_shape": [3, 64, 64]},
        "data": {"dataset": "synthetic", "shape": [3, 64, 64], "samples": 128, "eval_batch_size": 64},
        "evaluate": {"latency": {"enabled": False}},
        "stages": [{"type": "prune", "name": "prune", "method": "structured", "amount": 0.5}],
    }
    report = run_recipe_dict(recipe, _folder(tmp, "resnet18"))
    row = _row("resnet18 64x64 structured 50%", report, "baseline", "prune", 1, (3, 64, 64))
    _, pruned = _models(report, "baseline", "prune")
    pruned.train()
    pruned(torch.randn(4, 3, 64, 64)).logsumexp(1).mean().backward()
    trains = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in pruned.parameters())
    row["target"] = _verdict(row["MACs x"] >= 3 and row["speedup"] >= 2 and trains, "MACs>=3x b1>=2x fwd/bwd")
    return row


def run() -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-prune-"))
    try:
        return [digits_structured(tmp), resnet18_structured(tmp), digits_magnitude(tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
