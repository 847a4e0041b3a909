"""The mobile zoo: mobile-class networks from torchvision and timm, each trained briefly on the bundled digits (upsampled to 3x32x32), through
prune -> static int8 -> export with default settings, in ONNX Runtime on this machine's CPU.

Models (no weights are downloaded: every model starts from its own random init and is trained here):
torchvision mobilenet_v2 (width 0.5), mobilenet_v3_small, mnasnet0_5, regnet_x_400mf; timm mobilenetv3_small_050,
efficientnet_b0 (timm's BatchNormAct2d layers), ghostnet_050 (if timm knows it). Each row prints the shipped
int8 file's agreement with its float source (the deploy.fidelity gate, with the layers automatic mixed precision
kept float), its accuracy drop, size ratio and batch-1 / batch-32 speed against the pruned float file it was made
from and against the unpruned float file (pruning can cost speed), timed interleaved in one run, and the file the
report recommends.

Goal (issue 21): every int8 file at >= 0.99 agreement and <= 1 point drop; every recommended file at least as
fast as the float file. `float holds`, for a file that fails the gate: the share of its top-1 predictions the float
model itself keeps when its weights move randomly by int8 rounding's size (below the gate, no int8 file can follow
that model). `BENCH_MOBILE=name1,name2 python -m benchmarks mobile` runs a subset.

The files are built for this machine's CPU (deploy.cpu: auto; the `cpu` column names it): 8-bit weights on a
VNNI CPU, 7-bit on an AVX2-only one, where 8-bit weights could saturate.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import run_recipe_dict, stage

TITLE = "mobile zoo: prune -> int8 -> export, int8 file vs its float file, ONNX Runtime on this CPU"
MODELS: dict[str, dict[str, Any]] = {
    "tv mobilenet_v2 x0.5": {"torchvision": "mobilenet_v2", "kwargs": {"num_classes": 10, "width_mult": 0.5}},
    "tv mobilenet_v3_small": {"torchvision": "mobilenet_v3_small", "kwargs": {"num_classes": 10}},
    "tv mnasnet0_5": {"torchvision": "mnasnet0_5", "kwargs": {"num_classes": 10}},
    "tv regnet_x_400mf": {"torchvision": "regnet_x_400mf", "kwargs": {"num_classes": 10}},
    "timm mobilenetv3_small_050": {"timm": "mobilenetv3_small_050", "kwargs": {"num_classes": 10}},
    "timm efficientnet_b0": {"timm": "efficientnet_b0", "kwargs": {"num_classes": 10}},
    "timm ghostnet_050": {"timm": "ghostnet_050", "kwargs": {"num_classes": 10}},
}


def recipe(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "compresspipe": 1, "name": "mobile", "seed": 0, "device": "cpu",
        "model": {**model, "input_shape": [3, 32, 32]},
        "data": {"dataset": "digits", "size": 32, "channels": 3, "batch_size": 64, "eval_batch_size": 64},
        "evaluate": {"latency": {"batch_sizes": [1, 32], "warmup": 3, "iters": 20, "threads": 1}},
        # files for this machine's CPU (8-bit weights on a VNNI or ARM CPU); the default, portable, limits weights to
        # 7 bits so that AVX2-only CPUs cannot saturate, and costs mobile networks agreement: a portable file that
        # fails the gate says in a note what the 8-bit file reaches
        "deploy": {"runtime": "onnxruntime", "rounds": 7, "cpu": "auto"},
        "stages": [
            {"type": "train", "epochs": 20, "lr": 3.0e-3, "optimizer": "adamw", "weight_decay": 1.0e-4},
            {"type": "prune", "method": "structured", "amount": 0.2,
             "finetune": {"epochs": 10, "lr": 5.0e-4, "distill": "baseline"}},
            {"type": "quantize", "method": "static"},
            {"type": "export", "formats": ["onnx_int8"]},
        ],
    }


def run() -> list[dict[str, Any]]:
    wanted = [w for w in os.environ.get("BENCH_MOBILE", "").split(",") if w]
    rows: list[dict[str, Any]] = []
    for case, model in MODELS.items():
        if wanted and not any(w in case for w in wanted):
            continue
        report: dict[str, Any] | None = None
        try:
            report = run_recipe_dict(recipe(model))
        except Exception as exc:  # a model this timm/torchvision does not have, or a failed gate
            report = getattr(exc, "report", None)
            if report is None:
                rows.append({"case": case, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                continue
        assert report is not None
        rows.append(row(case, report))
    return rows


def row(case: str, report: dict[str, Any]) -> dict[str, Any]:
    """One zoo row from a run's report.json."""
    from compresspipe.runtimes.cpu import cpu_model, host_target

    final = report["stages"][-1]
    source = stage(report, "prune")
    fid = final.get("fidelity") or {}
    rec = report.get("recommendation") or {}
    lat, flat = final.get("latency_ms") or {}, source.get("latency_ms") or {}
    # against the unpruned float file too: pruning can cost speed (channel counts off a multiple of 8), which the
    # columns against the pruned float file do not show
    tlat = stage(report, "train").get("latency_ms") or {}
    # when the gate fails: how much of its top-1 the float model itself keeps under weight noise of int8 rounding's
    # size (the quantize stage's check); below the gate, no int8 file can follow that model
    held = ((stage(report, "quantize").get("formats") or {}).get("onnx_int8", {}).get("fidelity") or {}) \
        .get("stability") or {}
    return {
        "case": case,
        "agreement": fid.get("agreement"),
        "drop pts": None if fid.get("drop") is None else 100 * fid["drop"],
        "float layers": len(fid.get("float_layers") or []),
        "fidelity": "pass" if fid.get("passed") else "FAIL",
        "float holds": held.get("weights"),
        "size x": (source["bytes"] / final["bytes"]) if final.get("bytes") else None,
        "b1 x": flat["1"] / lat["1"] if lat.get("1") and flat.get("1") else None,
        "b32 x": flat["32"] / lat["32"] if lat.get("32") and flat.get("32") else None,
        "b1 x unpruned": tlat["1"] / lat["1"] if lat.get("1") and tlat.get("1") else None,
        "b32 x unpruned": tlat["32"] / lat["32"] if lat.get("32") and tlat.get("32") else None,
        "ships": f"{rec.get('format')} of {rec.get('stage')}",
        "cpu": f"{cpu_model()[:28]} ({host_target()})",
    }
