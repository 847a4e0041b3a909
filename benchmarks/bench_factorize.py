"""Factorization: exact parameter counts, digits-cnn with energy 0.9 + fine-tuning, and a Linear-heavy MLP.

Every comparison is made in this process: the factorized model against the model it came from. Latency is
timed by interleaving the two models over several rounds (CPU, 1 thread, median), so that load from other
processes hits both alike.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks import common
from benchmarks.common import run_recipe_dict, stage

TITLE = "factorize: factorized model vs the model it came from (ratios > 1 are better)"
COLUMNS = ("case", "params before", "params after", "params x", "MACs x", "acc after", "Δacc pts", "speedup b1",
           "speedup b64", "speedup/MACs x", "target")  # params before/after: of the factorized layers
RECIPE = Path(__file__).parent.parent / "recipes" / "factorize.yaml"


def paired_latency(reference: Any, new: Any, shape: tuple[int, ...], batch: int, rounds: int = 7,
                   iters: int = 30) -> tuple[float, float, float]:
    return common.paired_latency(reference, new, shape, batch, rounds, iters, warmup=3)


def _verdict(ok: bool, what: str) -> str:
    return f"{'met' if ok else 'MISSED'}: {what}"


def _factorize(module: Any, shape: tuple[int, ...], **cfg: Any) -> tuple[Any, list[dict[str, Any]]]:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.factorize import FactorizeConfig
    from compresspipe.stages.factorize.stage import factorize_model

    state = ModelState(module.eval(), {}, shape, None)
    rows = factorize_model(state, FactorizeConfig(type="factorize", **cfg), "factorize")
    return state.module, rows


def linear_1000() -> dict[str, Any]:
    import torch
    from torch import nn

    from compresspipe.metrics import count_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000))
    before = count_params(model)
    model, _ = _factorize(model, (1000,), rank={"fixed": 100})
    after = count_params(model)
    return {"case": "Linear(1000,1000) fixed 100", "params before": before, "params after": after,
            "params x": before / after,
            "target": _verdict((before, after) == (1_001_000, 201_000), "exact counts")}


def _digits(tmp: Path, train: dict[str, Any] | None, case: str) -> dict[str, Any]:
    from compresspipe.artifacts.model import load_model

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["evaluate"] = {"latency": {"enabled": False}}
    if train is not None:
        recipe["stages"][0] = {"type": "train", **train}
    tmp.mkdir(parents=True, exist_ok=True)
    report = run_recipe_dict(recipe, tmp)
    a, b = stage(report, "train"), stage(report, "factorize")
    folder = Path(report["run_folder"])
    layers = json.loads((folder / b["folder"] / "factorization.json").read_text())["layers"]
    done = [r for r in layers if r["skipped"] is None]
    before, after = sum(r["params before"] for r in done), sum(r["params after"] for r in done)
    reference, new = load_model(folder / a["folder"]).module, load_model(folder / b["folder"]).module
    _, _, b1 = paired_latency(reference, new, (1, 8, 8), 1)
    _, _, b64 = paired_latency(reference, new, (1, 8, 8), 64)
    return {
        "case": case, "ranks": ", ".join(f"{r['layer']} {r['rank']}/{r['full rank']}" for r in done) or "none",
        "params before": before, "params after": after, "params x": before / max(after, 1),  # factorized layers
        "acc before": a["accuracy"], "acc after": b["accuracy"],
        "Δacc pts": round(100 * (b["accuracy"] - a["accuracy"]), 2), "MACs x": a["macs"] / b["macs"],
        "speedup b1": b1, "speedup b64": b64,
    }


def digits_energy(tmp: Path) -> dict[str, Any]:
    row = _digits(tmp / "digits", None, "digits-cnn energy 0.9 (recipe)")
    row["case"] += f": {row['ranks']}"
    ok = (row["params x"] >= 2 and row["Δacc pts"] >= -0.5 and row["speedup b1"] >= 0.95
          and row["speedup b64"] >= 0.95)
    row["target"] = _verdict(ok, "params>=2x Δacc>=-0.5 speedups>=0.95")
    return row


def digits_energy_plain_adam(tmp: Path) -> dict[str, Any]:
    """Contrast: the same stage after training without weight decay (weights far from low rank)."""
    row = _digits(tmp / "digits-adam", {"epochs": 15, "lr": 1.0e-3},
                  "same, trained with plain adam")
    row["case"] += f": {row['ranks']}"
    row["target"] = "contrast: why the recipe uses weight decay"
    return row


def mlp() -> dict[str, Any]:
    import copy

    import torch
    from torch import nn

    from compresspipe.metrics import count_macs, count_params

    torch.manual_seed(0)
    shape = (1024,)
    reference = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    original = copy.deepcopy(reference)  # the factorization works in place on `reference`
    new, rows = _factorize(reference, shape, rank={"ratio": 0.125}, min_saving=0.0)
    macs_x = count_macs(original, shape) / count_macs(new, shape)  # type: ignore[operator]
    ref_ms, new_ms, speedup = paired_latency(original, new, shape, 64)
    return {
        "case": "MLP 1024-4096-4096-10 ratio 1/8", "ranks": ", ".join(f"{r['layer']} {r['rank']}" for r in rows),
        "params before": count_params(original), "params after": count_params(new),
        "params x": count_params(original) / count_params(new), "MACs x": macs_x, "batch": 64,
        "ms b64 before": ref_ms, "ms b64 after": new_ms, "speedup b64": speedup, "speedup/MACs x": speedup / macs_x,
        "target": _verdict(speedup >= 0.6 * macs_x, "speedup >= 0.6 MACs x"),
    }


def run() -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-factorize-"))
    try:
        rows = [linear_1000(), mlp(), digits_energy(tmp), digits_energy_plain_adam(tmp)]
        return [{c: r.get(c, "") for c in COLUMNS} for r in rows]  # one table: the same columns in every row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
