import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compresspipe.cli import app
from compresspipe.recipe import load_recipe
from compresspipe.run.executor import RunOptions, run_recipe
from compresspipe.stages.distill.stage import labelled_indices
from compresspipe.training.losses import distillation_loss
from compresspipe.ui import UI
from tests.fixtures import CNN, run, tiny_recipe, write_recipe

runner = CliRunner()
TEACHER = {"type": "train", "name": "teach", "epochs": 3, "lr": 3e-3}


def _run(tmp_path, stages, out="run", **changes):
    return run(tmp_path, tiny_recipe(stages=stages, **changes), out).report


def _cli_run(tmp_path, stages, name="recipe.yaml", **changes):
    path = write_recipe(tmp_path, tiny_recipe(stages=stages, **changes), name)
    return runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r"), "-q"], catch_exceptions=False)


# --- the loss --------------------------------------------------------------------------------------


def test_distillation_loss_is_the_documented_mix():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    T = 3.0
    kl = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    ce = F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, T, 0.7), 0.7 * kl + 0.3 * ce, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, y, T, 1.0), kl, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, y, T, 0.0), ce, atol=1e-6)
    assert distillation_loss(t, t, y, T, 1.0).abs() < 1e-6  # a student equal to its teacher: no soft loss
    mask = torch.tensor([True, False, True, False, False, False])
    assert torch.allclose(distillation_loss(s, t, y, T, 0.0, mask), F.cross_entropy(s[mask], y[mask]), atol=1e-6)
    assert distillation_loss(s, t, y, T, 0.0, torch.zeros(6, dtype=torch.bool)) == 0  # no label in the batch
    s.requires_grad_(True)
    distillation_loss(s, t, y, T, 0.5, mask).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# --- acceptance: bad configs exit 2 with a clear message --------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"teacher": "nope"}, "stages[1].teacher: unknown teacher stage 'nope'"),
    ({"teacher": "teach2"}, "did you mean 'teach'"),
    ({"teacher": "later"}, "stage 'later' (stages[2]) runs after this one"),
    ({"teacher": "distill"}, "is this stage itself"),
    ({"temperature": 0}, "stages[1].temperature: must be greater than 0"),
    ({"temperature": -2}, "stages[1].temperature: must be greater than 0"),
    ({"alpha": 1.5}, "stages[1].alpha: must be less than or equal to 1"),
    ({"alpha": -0.1}, "stages[1].alpha: must be greater than or equal to 0"),
    ({"labels_fraction": 0}, "stages[1].labels_fraction: must be greater than 0"),
    ({"student": "smaller"}, "stages[1].student: must be one of: current"),
    ({"teacher": {"builtin": "digits-cnn"}}, "needs weights"),
    ({"student": {"builtin": "digits-cnx"}}, "stages[1].student.builtin: unknown model 'digits-cnx'"),
])
def test_bad_config_exits_2_with_file_and_line(tmp_path, change, message):
    stages = [TEACHER, {"type": "distill", **change}, {"type": "train", "name": "later", "epochs": 1}]
    result = _cli_run(tmp_path, stages)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "recipe.yaml:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # rejected before anything ran


def test_student_with_other_output_size_exits_2(tmp_path):
    student = {"builtin": "digits-mlp", "kwargs": {"hidden": 16, "num_classes": 7}}
    result = _cli_run(tmp_path, [{"type": "distill", "student": student, "epochs": 1}])
    assert result.exit_code == 2, result.output
    assert "output size [7] differs from the teacher's [10]" in result.output
    assert not (tmp_path / "r").exists()  # found by the preflight plan, before anything ran


def test_unknown_feature_module_exits_2_with_suggestion(tmp_path):
    stages = [{"type": "distill", "epochs": 1, "features": [{"student": "fc1", "teacher": "fc_1"}]}]
    result = _cli_run(tmp_path, stages)
    assert result.exit_code == 2, result.output
    assert "unknown teacher module 'fc_1'; did you mean 'fc1'?" in result.output


# --- behaviour ------------------------------------------------------------------------------------------


def test_label_scarce_distillation_uses_the_teacher_and_caches_it(tmp_path):
    """5% of labels: the distilled student learns from the teacher's logits (looked up, never recomputed)."""
    common = {"student": {"builtin": "digits-mlp", "kwargs": {"hidden": 16}}, "epochs": 4, "lr": 1e-2,
              "labels_fraction": 0.05, "temperature": 2.0}
    report = _run(tmp_path, [{**TEACHER, "epochs": 6, "lr": 1e-2},
                             {"type": "distill", "name": "kd", "alpha": 0.9, **common},
                             {"type": "distill", "name": "labels_only", "alpha": 0.0, **common}])
    teacher, kd, alone = report["stages"][1:]
    d = kd["details"]
    assert d["labelled_samples"] == round(0.05 * d["train_samples"]) and d["train_samples"] == 480
    assert d["teacher_cached"] and d["teacher_batches_run"] == 0
    assert d["teacher"] == "teach (baseline)" and d["teacher_accuracy"] == teacher["accuracy"]
    assert kd["kind"] == "structural" and kd["params"] == d["student_params"] < teacher["params"]
    assert kd["accuracy"] > 0.6 and kd["accuracy"] > alone["accuracy"] + 0.3, (kd["accuracy"], alone["accuracy"])


def test_current_student_from_a_checkpoint_teacher(tmp_path):
    """Distil into the current model from a teacher given as a spec + checkpoint; structure is unchanged."""
    trained = _run(tmp_path, [TEACHER], out="t", model=CNN)
    ckpt = tmp_path / "teacher.safetensors"
    save_file(load_file(str(tmp_path / "t" / "01-teach" / "model.safetensors")), str(ckpt))
    teacher = {"builtin": "digits-cnn", "kwargs": CNN["kwargs"], "checkpoint": str(ckpt)}
    report = _run(tmp_path, [{"type": "distill", "teacher": teacher, "epochs": 2, "lr": 1e-2, "alpha": 1.0}])
    base, distilled = report["stages"]
    d = distilled["details"]
    assert d["teacher"] == "digits-cnn" and d["teacher_accuracy"] == trained["stages"][1]["accuracy"]
    assert distilled["kind"] == "weights" and distilled["params"] == base["params"]
    assert distilled["accuracy"] > base["accuracy"] + 0.3


def test_labelled_indices_are_a_seeded_sorted_subset():
    a = labelled_indices(1000, 0.05, seed=3)
    assert len(a) == 50 and torch.equal(a, labelled_indices(1000, 0.05, seed=3))
    assert torch.equal(a, a.sort().values) and len(set(a.tolist())) == 50 and int(a.max()) < 1000
    assert not torch.equal(a, labelled_indices(1000, 0.05, seed=4))
    assert len(labelled_indices(10, 0.01, seed=0)) == 1


def test_interrupted_distill_resumes_after_the_last_epoch_with_its_adapters(tmp_path, monkeypatch):
    student = {"builtin": "digits-mlp", "kwargs": {"hidden": 16}}  # fc1: 16 wide, the teacher's 32: a Linear adapter
    stages = [{"type": "distill", "student": student, "epochs": 3, "lr": 1e-2,
               "features": [{"student": "fc1", "teacher": "fc1", "weight": 0.5}]}]
    full = _run(tmp_path, stages, out="full")
    from compresspipe.training import loop as training

    real_evaluate, calls = training.evaluate, {"n": 0}

    def interrupt_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stages, out="cut")
    monkeypatch.undo()
    path = write_recipe(tmp_path, tiny_recipe(stages=stages), "cut.yaml")
    resumed = run_recipe(load_recipe(path), path, RunOptions(out=tmp_path / "cut", resume=True), UI(quiet=True))
    a, b = full["stages"][1], resumed.report["stages"][1]
    assert "resumed after epoch 2" in b["notes"]
    assert b["details"]["history"] == a["details"]["history"] and b["accuracy"] == a["accuracy"]
    assert b["details"]["tables"]["feature losses"][0]["adapter"] == "Linear"
    weights = [load_file(str(f / "01-distill" / "model.safetensors")) for f in (tmp_path / "full", tmp_path / "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_larger_hugging_face_teacher_with_hidden_state_losses(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.fixtures import TINY_BERT, text_recipe

    torch.manual_seed(0)  # the teacher: wider (48) and deeper (3 layers) than the student, saved as a folder
    big = {**TINY_BERT, "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 96}
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**big, num_labels=2)).save_pretrained(
        tmp_path / "teacher")
    distill = {"type": "distill", "epochs": 1, "teacher": {"huggingface": "teacher"},
               "features": [{"student": "model.bert.encoder.layer.1", "teacher": "model.bert.encoder.layer.2"}]}
    result = run(tmp_path, text_recipe(stages=[distill]))
    details = json.loads((result.folder / "01-distill" / "metrics.json").read_text())["details"]
    assert details["teacher"] == "huggingface:teacher" and details["teacher_params"] > 1.5 * details["student_params"]
    assert details["tables"]["feature losses"][0]["adapter"] == "Linear"  # hidden 32 -> 48
    assert details["teacher_batches_run"] > 0


def test_a_pruned_decoder_lm_matches_its_teachers_hidden_states(tmp_path):
    """Token-level KL plus hidden-state matching for a causal LM: a decoder block's output (batch, tokens,
    hidden) against the unpruned teacher's, no adapter where the widths agree."""
    pytest.importorskip("transformers")
    from tests.fixtures import run, tiny_recipe
    from tests.stages.test_prune_decoder import LM_DATA, TINY_LLAMA

    block = "model.model.layers.1"
    recipe = tiny_recipe(name="lm-hidden", task="language_modeling",
                         model={"huggingface": {"config": dict(TINY_LLAMA)}}, data=dict(LM_DATA),
                         deploy={"runtime": "torch"},
                         stages=[{"type": "train", "epochs": 1, "lr": 3.0e-3},
                                 {"type": "prune", "method": "structured", "amount": 0.25, "heads": 0.5},
                                 {"type": "distill", "epochs": 1, "teacher": "train",
                                  "features": [{"student": block, "teacher": block, "weight": 0.5}]}])
    result = run(tmp_path, recipe)
    details = json.loads((result.folder / "03-distill" / "metrics.json").read_text())["details"]
    assert details["tables"]["feature losses"] == [{"student": block, "teacher": block, "weight": 0.5,
                                                    "adapter": "none", "adapter_params": 0}]
    assert details["teacher"] == "train" and details["teacher_params"] > details["student_params"]
    row = next(s for s in result.report["stages"] if s["name"] == "distill")
    assert row["metric"] == "perplexity" and 1 < row["score"] < float("inf")
