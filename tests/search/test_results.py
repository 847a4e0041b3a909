"""The Pareto front and the pick, from trial rows alone (no trial runs)."""

from __future__ import annotations

from compresspipe.search.results import pareto_front, pick

NAMES = ["accuracy", "accuracy_drop", "bytes", "latency_b1", "speedup_b1"]


def _row(number, drop, size, ms, state="complete", passed=True):
    return {"number": number, "state": state, "gates_passed": passed,
            "figures": {"accuracy_drop": drop, "bytes": size, "latency_b1": ms, "accuracy": 0.99 - drop}}


ROWS = [_row(0, 0.002, 40_000, 0.010), _row(1, 0.001, 50_000, 0.012), _row(2, 0.004, 30_000, 0.009),
        _row(3, 0.003, 45_000, 0.011), _row(4, 0.0, 20_000, 0.005, passed=False),
        _row(5, 0.0, 10_000, 0.001, state="stopped early")]


def test_pareto_front_counts_only_trials_that_pass_the_gates():
    objectives = {"accuracy_drop": "minimize", "bytes": "minimize"}
    assert pareto_front(ROWS, objectives) == [0, 1, 2]  # 3 is dominated by 0; 4 failed a gate; 5 did not finish
    assert pareto_front(ROWS, {"accuracy": "maximize", "latency_b1": "minimize"}) == [0, 1, 2]


def test_pick_applies_limits_then_the_goal_then_the_objectives():
    objectives = {"accuracy_drop": "minimize", "bytes": "minimize"}
    best, why = pick(ROWS, {"minimize": "latency_b1", "max_accuracy_drop": 0.003}, objectives, NAMES)
    assert best["number"] == 0 and "minimize latency_b1 among 3 of 5 finished trial(s)" in why
    best, _ = pick(ROWS, {"minimize": "bytes"}, objectives, NAMES)
    assert best["number"] == 2
    none, why = pick(ROWS, {"minimize": "bytes", "max_accuracy_drop": 0.0001}, objectives, NAMES)
    assert none is None and "no finished trial passes the recipe's gates and" in why
    none, why = pick([], {"minimize": "bytes"}, objectives, NAMES)
    assert none is None and why == "no trial has finished"
