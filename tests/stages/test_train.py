import pytest

from compresspipe.errors import RecipeError
from compresspipe.recipe import load_recipe
from tests.fixtures import run, tiny_recipe, write_recipe


def _run(tmp_path, stage, out="run"):
    return run(tmp_path, tiny_recipe(stages=[stage]), out).report


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "step"), ("adamw", "none"), ("adam", "cosine")])
def test_optimizers_and_schedules_train(tmp_path, optimizer, schedule):
    stage = {"type": "train", "epochs": 3, "lr": 0.2 if optimizer == "sgd" else 1e-2, "optimizer": optimizer,
             "schedule": schedule, "step_size": 2, "weight_decay": 1e-4, "label_smoothing": 0.1}
    report = _run(tmp_path, stage)
    base, trained = report["stages"]
    assert trained["accuracy"] > 0.5 > base["accuracy"] + 0.3
    history = trained["details"]["history"]
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]


def test_best_epoch_is_kept(tmp_path):
    report = _run(tmp_path, {"type": "train", "epochs": 4, "lr": 0.5, "optimizer": "sgd", "schedule": "none"})
    trained = report["stages"][1]
    history = trained["details"]["history"]
    best = max(h["val_accuracy"] for h in history)
    assert trained["accuracy"] == best
    assert trained["details"]["best_epoch"] == 1 + [h["val_accuracy"] for h in history].index(best)


def test_zero_epochs_keeps_the_model(tmp_path):
    report = _run(tmp_path, {"type": "train", "epochs": 0})
    assert report["stages"][0]["accuracy"] == report["stages"][1]["accuracy"]


@pytest.mark.parametrize("field,value,message", [
    ("lr", 0, "greater than 0"),
    ("optimizer", "lbfgs", "must be one of: sgd, adam, adamw"),
    ("label_smoothing", 1.0, "less than 1"),
    ("epochs", -1, "greater than or equal to 0"),
])
def test_bad_values_are_recipe_errors(tmp_path, field, value, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", field: value}])))
