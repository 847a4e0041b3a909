"""factorize rank: {max_accuracy_drop}: ranks from each layer's sensitivity, raised until the whole model fits."""

from __future__ import annotations

from compresspipe.metrics import evaluate
from compresspipe.stages.factorize.stage import FactorizeStage
from tests.fixtures import cli, digits_cnn_recipe, stage_context, tiny_recipe, trained_cnn, write_recipe


def test_ranks_keep_the_drop_within_the_limit(tmp_path):
    recipe = digits_cnn_recipe()
    recipe["stages"] = [{"type": "factorize", "rank": {"max_accuracy_drop": 0.03}, "min_saving": 0.0}]
    parsed, ctx = stage_context(tmp_path, recipe, "factorize", stage_dir=tmp_path / "stage")
    stage = FactorizeStage(parsed.stages[0])
    val = ctx.data.loader("val", 64)
    before, _ = evaluate(trained_cnn().module, val, "cpu")
    result = stage.run(trained_cnn(), ctx)
    after, _ = evaluate(result.state.module, val, "cpu")
    assert before - after <= 0.03 + 1e-9
    search = result.details["tables"]["rank search"]
    assert search[-1]["fits"] == "yes" and all(r["fits"] == "no" for r in search[:-1])
    rows = {r["layer"]: r for r in result.details["tables"]["per layer"]}
    for row in rows.values():  # every layer is factorized at a measured ratio, or kept whole and says why
        assert row["rank"] is not None or row["skipped"]
    assert result.notes[0].startswith("rank max_accuracy_drop 0.03:")
    plan = stage.plan(trained_cnn(), ctx)  # the plan shows the ranks it would use (the curves are cached now)
    assert set(plan.layers) == set(rows) and plan.notes[0].startswith("rank max_accuracy_drop 0.03:")


def test_the_rule_is_one_of_four(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "factorize", "rank": {"ratio": 0.5,
                                                                                      "max_accuracy_drop": 0.01}}]))
    result = cli("validate", path)
    assert result.exit_code == 2 and "give exactly one rank rule" in result.output
    assert "{max_accuracy_drop: 0.01}" in result.output
