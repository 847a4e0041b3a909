"""Tasks and the metric registry: each metric's value on known outputs, and gates that name any metric."""

from __future__ import annotations

import math

import pytest
import torch

from compresspipe.errors import RecipeError
from compresspipe.metrics import METRICS
from compresspipe.metrics.scores import Scorer
from compresspipe.metrics.tasks import TASKS, loss
from compresspipe.recipe import load_recipe
from compresspipe.recipe.spec import Limits
from compresspipe.report.gates import judge
from tests.fixtures import text_recipe, tiny_recipe, write_recipe


def test_registry_holds_the_builtin_metrics_and_each_task_names_registered_ones():
    assert {"top1", "top5", "f1_macro", "mse", "mae", "perplexity"} <= set(METRICS.names())
    for info in TASKS.values():
        assert info.default_metric == info.metrics[0] and all(m in METRICS for m in info.metrics)


def test_classification_metrics_on_known_outputs():
    from sklearn.metrics import f1_score

    logits = torch.tensor([[3.0, 1, 0, 0, 0, 0], [0, 3, 1, 0, 0, 0], [0, 1, 3, 0, 0, 0], [3, 0, 0, 1, 0, 0]])
    labels = torch.tensor([0, 2, 2, 3])
    scorer = Scorer("classification", 6, ["top1", "top5", "f1_macro", "perplexity"])
    scorer.update(logits[:2], labels[:2])  # accumulated over batches
    scorer.update(logits[2:], labels[2:])
    got = scorer.result()
    assert got["top1"] == 0.5 and got["top5"] == 1.0
    want = f1_score(labels.numpy(), logits.argmax(1).numpy(), average="macro")
    assert got["f1_macro"] == pytest.approx(want)
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert got["loss"] == pytest.approx(ce) and got["perplexity"] == pytest.approx(math.exp(ce))


def test_per_token_tasks_skip_unlabelled_positions_and_regression_errors():
    logits = torch.zeros(2, 3, 4)
    logits[..., 1] = 5.0
    labels = torch.tensor([[1, 1, -100], [1, 2, -100]])
    scorer = Scorer("token_classification", 4)
    scorer.update(logits, labels)
    got = scorer.result()
    assert got["top1"] == 0.75  # 3 of the 4 labelled tokens
    assert float(loss("token_classification", logits, labels)) == pytest.approx(got["loss"])
    reg = Scorer("regression")
    reg.update(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [3.0]]))
    assert reg.result() == {"loss": 0.5, "mse": 0.5, "mae": 0.5}


def test_gates_and_expect_name_any_metric_in_its_direction(tmp_path):
    recipe = tiny_recipe(gates={"max_drop": {"f1_macro": 0.01, "loss": 0.5}, "target": {"top5": 0.9}})
    assert load_recipe(write_recipe(tmp_path, recipe)).gates.max_drop == {"f1_macro": 0.01, "loss": 0.5}
    row = {"name": "s", "format": "onnx", "accuracy": 0.9, "metrics": {"top1": 0.9, "f1_macro": 0.85, "top5": 0.95},
           "loss": 0.3, "vs_reference": {"accuracy_delta": -0.01, "metric_delta": {"f1_macro": -0.02, "loss": 0.1}}}
    results = {r["gate"]: r for r in judge(Limits(max_drop={"f1_macro": 0.01, "loss": 0.5}, target={"top5": 0.9}),
                                            row, 1, "gates")}
    assert results["max_drop.f1_macro"]["value"] == pytest.approx(0.02) and not results["max_drop.f1_macro"]["passed"]
    assert results["max_drop.loss"]["passed"] and results["target.top5"]["passed"]
    reg = {**row, "metrics": {"mse": 0.2}, "vs_reference": {"metric_delta": {"mse": 0.05}}}
    mse = judge(Limits(max_drop={"mse": 0.01}, target={"mse": 0.25}), reg, 1, "gates")
    assert [r["passed"] for r in mse] == [False, True]  # mse rose by 0.05 > 0.01; 0.2 is at most 0.25

    for gates, message in (({"max_drop": {"f1_makro": 0.1}}, "did you mean 'f1_macro'"),
                           ({"target": {"mse": 0.1}}, "does not apply to task classification"),
                           ({"max_accuracy_drop": 0.01}, "has no top-1 accuracy"),
                           ({"min_reference_accuracy": 0.5}, "has no top-1 accuracy")):
        task = "regression" if "accuracy" in next(iter(gates)) else "classification"
        bad = tiny_recipe(gates=gates, task=task)
        with pytest.raises(RecipeError, match=message):
            load_recipe(write_recipe(tmp_path, bad))


def test_task_picks_the_loss_and_the_text_target(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, text_recipe(task="language_modeling",
                                                            model={"huggingface": {"config": {"model_type": "gpt2",
                                                                                              "n_layer": 1}}})))
    from compresspipe.data.config import text_target

    assert recipe.task == "language_modeling" and text_target(recipe.data, recipe.task).target == "next_token"
