"""Distillation on digits, side by side in one run, sharing one trained teacher (digits-cnn, 151K params).

(1) Label-scarce: only 5% of the training labels. Each student distilled from the teacher (soft loss on
    every training image, hard loss on the 5%) against the same student trained on those labels alone,
    twice: the distill stage with alpha 0 (hard loss only, same subset), and a plain `fit` on just the
    labelled subset (as many steps, best epoch by validation); the better of the two is the bar.
    Target: distilled >= 8 points better. Three students: a CNN (whose convolutional prior already does
    well on 72 labels of 8x8 digits, leaving little room below the teacher) and two small MLPs.
(2) Full labels: a student with ~1/4 of the teacher's parameters, distilled, against the teacher and the
    same student trained from scratch on labels (alpha 0). Target: within 1 point of the teacher.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import run_recipe_dict, stage

TITLE = "distill: 5% labels (distilled vs labels alone) and a 1/4-size student (vs teacher)"

SEED = 0
# Students: a CNN with 0.25x the teacher's parameters, and two small MLPs (no convolutional prior).
STUDENTS: dict[str, dict[str, Any]] = {
    "cnn w16": {"builtin": "digits-cnn", "kwargs": {"width": 16, "hidden": 64}},
    "mlp h64": {"builtin": "digits-mlp", "kwargs": {"hidden": 64}},
    "mlp h16": {"builtin": "digits-mlp", "kwargs": {"hidden": 16}},
}
KD = {"type": "distill", "teacher": "baseline", "temperature": 4.0, "epochs": 20, "lr": 2e-3}
# few labels, many unlabelled images: a longer schedule and a softer temperature (same budget for labels-only)
KD_SCARCE = {**KD, "temperature": 2.0, "epochs": 60, "lr": 5e-3}
SCARCE = 0.05


def _stages() -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = [{"type": "train", "name": "teacher", "epochs": 15, "lr": 1e-3}]
    for key, spec in STUDENTS.items():
        tag = key.replace(" ", "-")
        stages += [
            {**KD_SCARCE, "name": f"kd-5pct-{tag}", "student": spec, "alpha": 0.9, "labels_fraction": SCARCE},
            {**KD_SCARCE, "name": f"labels-5pct-{tag}", "student": spec, "alpha": 0.0, "labels_fraction": SCARCE},
        ]
    cnn = STUDENTS["cnn w16"]
    stages += [{**KD, "name": "kd-full", "student": cnn, "alpha": 0.7},
               {**KD, "name": "scratch-full", "student": cnn, "alpha": 0.0}]
    return stages


RECIPE: dict[str, Any] = {
    "compresspipe": 1,
    "name": "bench-distill",
    "seed": SEED,
    "device": "cpu",
    "model": {"builtin": "digits-cnn", "input_shape": [1, 8, 8]},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2},
    "evaluate": {"latency": {"enabled": False}},
    "stages": _stages(),
}


def _labels_alone_fit(student: dict[str, Any], steps: int) -> tuple[float, int]:
    """The student trained by the shared loop on the labelled 5% only (same subset as the distill stage)."""
    import dataclasses

    import torch
    import yaml
    from torch.utils.data import TensorDataset

    from compresspipe.data.sources import load_data
    from compresspipe.models.factory import build_model
    from compresspipe.recipe import load_recipe
    from compresspipe.recipe.training import TrainSettings
    from compresspipe.stages.distill.stage import labelled_indices
    from compresspipe.training.loop import fit

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(RECIPE))
        recipe = load_recipe(path)
    data = load_data(recipe.data, SEED, (1, 8, 8))
    inputs, labels = data.train.tensors  # type: ignore[attr-defined]
    kept = labelled_indices(len(labels), SCARCE, SEED)
    small = dataclasses.replace(data, train=TensorDataset(inputs[kept], labels[kept]))
    batch = 16
    epochs = max(1, -(-steps * batch // len(kept)))  # at least as many optimizer steps as the distilled run
    torch.manual_seed(SEED)
    model = build_model(student)
    settings = TrainSettings(epochs=epochs, lr=KD_SCARCE["lr"], batch_size=batch)
    result = fit(model, small, settings, device=torch.device("cpu"), seed=SEED, batch_size=batch)
    return float(result.best_accuracy or 0.0), len(kept)


def run() -> list[dict[str, Any]]:
    report = run_recipe_dict(RECIPE)
    teacher = stage(report, "teacher")
    t_acc, t_params = teacher["accuracy"], teacher["params"]

    def row(case: str, method: str, acc: float, params: int, check: str = "") -> dict[str, Any]:
        return {"case": case, "method": method, "val_acc_%": 100 * acc, "params": params,
                "param_ratio": params / t_params, "check": check}

    rows = [row("teacher", "train, all labels", t_acc, t_params)]
    for key, spec in STUDENTS.items():
        tag = key.replace(" ", "-")
        kd5, lab5 = stage(report, f"kd-5pct-{tag}"), stage(report, f"labels-5pct-{tag}")
        steps = -(-kd5["details"]["train_samples"] // 64) * KD_SCARCE["epochs"]
        alone_acc, n_labels = _labels_alone_fit(spec, steps)
        gain = 100 * (kd5["accuracy"] - max(lab5["accuracy"], alone_acc))
        case = f"5% labels ({n_labels}), {key}"
        rows += [
            row(case, "distilled (alpha 0.9)", kd5["accuracy"], kd5["params"],
                f"{gain:+.1f} pts vs best labels-only ({'PASS' if gain >= 8 else 'FAIL'} >= 8)"),
            row(case, "labels only: distill alpha 0", lab5["accuracy"], lab5["params"]),
            row(case, "labels only: fit on the subset", alone_acc, lab5["params"]),
        ]
    kd_full, scratch = stage(report, "kd-full"), stage(report, "scratch-full")
    gap = 100 * (t_acc - kd_full["accuracy"])
    rows += [
        row("all labels, cnn w16", "distilled (alpha 0.7)", kd_full["accuracy"], kd_full["params"],
            f"{gap:.2f} pts below teacher ({'PASS' if gap <= 1 else 'FAIL'} <= 1)"),
        row("all labels, cnn w16", "scratch (alpha 0)", scratch["accuracy"], scratch["params"]),
    ]
    return rows
