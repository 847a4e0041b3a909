import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compresspipe.artifacts.model import load_model
from compresspipe.errors import RunFolderError, StageError
from compresspipe.recipe import load_recipe
from tests.fixtures import run, tiny_recipe, write_recipe

STABLE = ("name", "type", "kind", "accuracy", "loss", "params", "nonzero_params", "sparsity", "bytes", "macs")


def _run(tmp_path, recipe=None, out="run", **opts):
    return run(tmp_path, recipe or tiny_recipe(), out, **opts)


def _stable(report):
    return [{k: s[k] for k in STABLE} for s in report["stages"]]


def _weights_hashes(folder: Path):
    return {p.parent.name: json.loads((p.parent / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]
            for p in sorted(folder.glob("*/model.safetensors"))}


def test_run_folder_layout_and_report(tmp_path):
    result = _run(tmp_path)
    folder = result.folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".lock", "00-baseline", "01-train", "recipe.lock.yaml", "report.html", "report.json", "report.md",
                     "run.json"]
    for stage in ("00-baseline", "01-train"):
        files = sorted(p.name for p in (folder / stage).iterdir())
        assert files == ["manifest.json", "metrics.json", "model.json", "model.safetensors"]
    report = json.loads((folder / "report.json").read_text())
    assert report["format"] == "compresspipe.report" and report["version"] == 2
    assert report["reference"] == "train"
    assert report["deploy"]["runtime"] == "torch"  # no deploy block and no export stage: the PyTorch model ships
    base, train = report["stages"]
    assert train["accuracy"] > base["accuracy"] + 0.3  # it really trained
    assert set(train["latency_ms"]) == {"1", "8"} and all(v > 0 for v in train["latency_ms"].values())
    assert train["params"] == base["params"] and train["macs"] == base["macs"] > 0
    assert train["vs_reference"]["size_reduction"] == pytest.approx(1.0)
    assert train["format"] == "torch" and train["files"] == ["01-train/model.safetensors", "01-train/model.json"]
    assert train["bytes"] == train["torch"]["bytes"] and train["accuracy"] == train["torch"]["accuracy"]
    assert "| 1 | train |" in (folder / "report.md").read_text()
    lock = (folder / "recipe.lock.yaml").read_text()
    assert "torch:" in lock and "recipe_sha256" in lock


def test_reload_is_bit_identical(tmp_path):
    folder = _run(tmp_path).folder
    state = load_model(folder / "01-train")
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    again = load_model(folder / "01-train")
    with torch.no_grad():
        assert torch.equal(state.module(x), again.module(x))
    metrics = json.loads((folder / "01-train" / "metrics.json").read_text())
    from compresspipe.data.sources import load_data

    recipe = load_recipe(tmp_path / "run.yaml")
    data = load_data(recipe.data, recipe.seed, (1, 8, 8))
    from compresspipe.metrics import evaluate

    acc, _ = evaluate(state.module, data.loader("val", 256), torch.device("cpu"))
    assert acc == metrics["accuracy"]


def test_two_runs_give_identical_metrics_and_weights(tmp_path):
    a = _run(tmp_path, out="a")
    b = _run(tmp_path, out="b")
    assert _stable(a.report) == _stable(b.report)
    assert _weights_hashes(a.folder) == _weights_hashes(b.folder)


def test_refuses_existing_run_unless_forced(tmp_path):
    _run(tmp_path)
    with pytest.raises(RunFolderError, match="holds a finished run"):
        _run(tmp_path)
    _run(tmp_path, force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(RunFolderError, match="not a compresspipe run folder"):
        _run(tmp_path, out="other", force=True)
    assert (tmp_path / "other" / "keep.txt").exists()


def test_resume_refuses_changed_recipe(tmp_path):
    _run(tmp_path)
    changed = tiny_recipe(seed=1)
    with pytest.raises(RunFolderError, match=r"seed: 0 -> 1"):
        _run(tmp_path, recipe=changed, resume=True)


def test_failing_stage_keeps_finished_stages(tmp_path, monkeypatch):
    from compresspipe.stages.train import stage as train

    def boom(self, state, ctx):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(train.TrainStage, "run", boom)
    recipe = tiny_recipe()
    with pytest.raises(StageError, match="stage 'train' failed: RuntimeError: kaboom"):
        _run(tmp_path, recipe=recipe)
    folder = tmp_path / "run"
    assert (folder / "00-baseline" / "manifest.json").exists()
    assert not (folder / "01-train").exists()
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"
    assert "kaboom" in (folder / "error.log").read_text()
    monkeypatch.undo()
    result = _run(tmp_path, recipe=recipe, resume=True)
    assert [s["name"] for s in result.report["stages"]] == ["baseline", "train"]


def test_interrupted_run_resumes_to_the_same_report(tmp_path, monkeypatch):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 2}, {"type": "train", "epochs": 1, "lr": 1e-3}])
    full = _run(tmp_path, recipe=recipe, out="full")
    from compresspipe.training import loop as training

    real_fit = training.fit
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr("compresspipe.stages.context.fit", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, recipe=recipe, out="cut")
    state = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert state["status"] == "interrupted" and state["failed_stage"] == "train-2"
    assert (tmp_path / "cut" / "01-train").exists() and not (tmp_path / "cut" / "02-train-2").exists()
    monkeypatch.undo()
    resumed = _run(tmp_path, recipe=recipe, out="cut", resume=True)
    assert _stable(resumed.report) == _stable(full.report)
    assert _weights_hashes(resumed.folder) == _weights_hashes(full.folder)


def test_killed_process_resumes(tmp_path):
    """A real SIGKILL in the middle of a stage: finished stages stay, --resume completes the run."""
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "train", "epochs": 40}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "compresspipe", "run", str(path), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "01-train" / "manifest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "01-train" / "manifest.json").exists()
    assert not (out / "02-train-2").exists()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "unfinished run" in again.stderr and "--resume" in again.stderr
    changed = subprocess.run([*cmd, "--resume", "--set", "stages.1.epochs=1"], capture_output=True, text=True)
    assert changed.returncode == 2 and "stages[1].epochs: 40 -> 1" in changed.stderr
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "train", "train-2"]
    assert report["status"] == "complete"


def test_interrupt_signal_exits_130_and_keeps_stages(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "train", "epochs": 500}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "compresspipe", "run", str(path), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "01-train" / "manifest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert (out / "01-train" / "manifest.json").exists()


def test_sigterm_is_an_interrupt_reports_say_so_and_resume_gives_the_same_weights(tmp_path):
    """CI cancels a job with SIGTERM: exit 143, report.json and run.json `interrupted`, finished stages kept, and
    --resume ends with the weights of a run that was never stopped."""
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "train", "epochs": 60, "lr": 1e-3}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "compresspipe", "run", str(path), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "01-train" / "manifest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM" in err and "--resume" in err
    state = json.loads((out / "run.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert state["status"] == "interrupted" and report["status"] == "interrupted" and "SIGTERM" in report["error"]
    assert (out / "01-train" / "manifest.json").exists() and not (out / "02-train-2").exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    full = _run(tmp_path, recipe=recipe, out="full")
    assert _weights_hashes(out) == _weights_hashes(full.folder)


def test_resume_inside_a_stage_continues_from_the_last_finished_epoch(tmp_path, monkeypatch):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 4, "lr": 3e-3, "optimizer": "sgd"}])
    full = _run(tmp_path, recipe=recipe, out="full")
    from compresspipe.training import loop as training

    real_evaluate = training.evaluate
    calls = {"n": 0}

    def interrupt_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, recipe=recipe, out="cut")
    checkpoint = tmp_path / "cut" / ".01-train.partial" / ".checkpoints" / "fit-01"
    assert (checkpoint / "state.safetensors").exists()
    monkeypatch.undo()
    resumed = _run(tmp_path, recipe=recipe, out="cut", resume=True)
    train = resumed.report["stages"][1]
    assert "resumed after epoch 2" in train["notes"]
    assert [h["epoch"] for h in train["details"]["history"]] == [1, 2, 3, 4]
    assert _stable(resumed.report) == _stable(full.report)
    assert _weights_hashes(resumed.folder) == _weights_hashes(full.folder)
    assert not (tmp_path / "cut" / "01-train" / ".checkpoints").exists()


def test_what_each_configured_stage_needs_is_checked_before_anything_runs(tmp_path):
    from compresspipe.data.sources import DataSplits
    from compresspipe.errors import InputError
    from compresspipe.run.setup import check_needs, stage_implementation

    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))
    full = torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    no_calibration = DataSplits(train=full, val=full, calibration=empty, num_classes=10, input_shape=(1, 8, 8))
    no_training = DataSplits(train=empty, val=full, calibration=full, num_classes=10, input_shape=(1, 8, 8))

    def check(stages: list, data: DataSplits) -> None:
        recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(stages=stages)))
        check_needs(recipe, [stage_implementation(c)(c) for c in recipe.stages], data)

    taylor = {"type": "prune", "amount": 0.5, "importance": "taylor"}
    with pytest.raises(InputError, match=r"stage 'prune' \(prune\) needs calibration data \(importance: taylor\)"):
        check([taylor], no_calibration)
    check([{"type": "prune", "amount": 0.5}], no_calibration)  # l2 importance, no fine-tuning: needs neither
    check([{"type": "quantize", "method": "dynamic"}, {"type": "export", "formats": ["onnx"]}], no_calibration)
    with pytest.raises(InputError, match=r"needs calibration data \(formats onnx_int8\)"):
        check([{"type": "export", "formats": ["onnx", "onnx_int8"]}], no_calibration)
    with pytest.raises(InputError, match=r"stage 'train' \(train\) needs train data"):
        check([{"type": "train", "epochs": 1}], no_training)
    with pytest.raises(InputError, match=r"needs train data \(finetune\)"):
        check([{"type": "prune", "amount": 0.5, "finetune": {"epochs": 1}}], no_training)


def test_config_errors_are_found_by_the_preflight_plan_and_exit_2_before_anything_runs(tmp_path):
    from tests.fixtures import cli

    stages = [{"type": "train", "epochs": 1}, {"type": "factorize", "rank": {"fixed": 999}}]
    result = cli("run", write_recipe(tmp_path, tiny_recipe(stages=stages)), "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "max rank is" in result.output and not (tmp_path / "r").exists()


def test_a_config_error_only_the_run_finds_is_exit_3_and_keeps_finished_stages(tmp_path, monkeypatch):
    """A stage whose plan cannot see the problem (a plugin without plan(), say): once stages ran, exit 3."""
    from compresspipe.stages.factorize.stage import FactorizeStage
    from tests.fixtures import cli

    monkeypatch.setattr(FactorizeStage, "plan", lambda self, state, ctx: None)
    stages = [{"type": "train", "epochs": 1}, {"type": "factorize", "rank": {"fixed": 999}}]
    result = cli("run", write_recipe(tmp_path, tiny_recipe(stages=stages)), "--out", tmp_path / "r")
    assert result.exit_code == 3, result.output
    assert "max rank is" in result.output
    assert (tmp_path / "r" / "01-train" / "model.safetensors").exists()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["status"] == "failed"


# --- any model, any inputs, any task: checked before any stage, run end to end -------------------------------


def test_labels_outside_the_models_classes_and_nan_inputs_are_exit_2_before_any_stage(tmp_path):
    import numpy as np

    from tests.fixtures import cli

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", inputs=rng.random((40, 1, 8, 8), dtype=np.float32), labels=np.arange(40) % 11)
    recipe = tiny_recipe(data={"dataset": "tensors", "path": "d.npz", "max_samples": 40})
    out = tmp_path / "run"
    result = cli("run", write_recipe(tmp_path, recipe), "--out", out, "-q")
    assert result.exit_code == 2 and "labels up to 10 (11 classes)" in result.output
    assert "has 10 outputs" in result.output and "Traceback" not in result.output
    assert not (out / "00-baseline").exists()
    np.savez(tmp_path / "d.npz", inputs=np.full((40, 1, 8, 8), np.inf, dtype=np.float32), labels=np.arange(40) % 10)
    result = cli("run", write_recipe(tmp_path, recipe), "--out", out, "-q")
    assert result.exit_code == 2 and "NaN or Inf" in result.output
    bad_std = tiny_recipe(data={"dataset": "imagefolder", "path": ".", "mean": [0.5], "std": [float("nan")]})
    result = cli("validate", write_recipe(tmp_path, bad_std))
    assert result.exit_code == 2 and "data.std[0]: must be a finite number" in result.output


def test_a_text_model_runs_end_to_end_with_named_inputs_and_dynamic_sequence(tmp_path):
    pytest.importorskip("transformers")
    import onnxruntime as ort

    from compresspipe.models.inputs import forward
    from tests.fixtures import text_recipe

    recipe = text_recipe(stages=[{"type": "train", "epochs": 2, "lr": 3.0e-3},
                                 {"type": "export", "formats": ["onnx"], "verify": {"batches": 1}}],
                         deploy={"runtime": "onnxruntime", "batch_sizes": [1, 8]})
    result = run(tmp_path, recipe)
    report = result.report
    assert [s["metric"] for s in report["stages"]] == ["top1"] * 3
    assert report["stages"][1]["accuracy"] > 0.6 and set(report["stages"][1]["metrics"]) == {"top1", "top5", "f1_macro"}
    assert report["stages"][0]["macs"] > 0
    export = result.folder / "02-export" / "export"
    entry = json.loads((export / "manifest.json").read_text())["files"][0]
    assert [i["name"] for i in entry["inputs"]] == ["input_ids", "attention_mask"]
    assert entry["inputs"][0]["shape"] == ["batch", "sequence"] and entry["inputs"][0]["dtype"] == "int64"
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"]] * 2
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["compresspipe.classes"]) == ["LABEL_0", "LABEL_1"]
    model = load_model(result.folder / "02-export").module
    ids = torch.randint(1, 64, (3, 7))  # another batch size and sequence length than any seen so far
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[0, 5:] = 0
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = forward(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)


def test_a_plan_that_breaks_is_a_warning_in_run_and_exit_3_in_plan(tmp_path, monkeypatch):
    """Only a config error found by a plan stops the run before it starts; a plan that crashes does not."""
    from compresspipe.stages.factorize.stage import FactorizeStage
    from tests.fixtures import cli

    def broken(self, state, ctx):
        raise RuntimeError("plan bug")

    monkeypatch.setattr(FactorizeStage, "plan", broken)
    stages = [{"type": "train", "epochs": 1}, {"type": "factorize", "rank": {"ratio": 0.5}}]
    path = write_recipe(tmp_path, tiny_recipe(stages=stages))
    result = cli("run", path, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "plan could not be checked before the run (RuntimeError: plan bug)" in " ".join(result.output.split())
    planned = cli("plan", path)
    assert planned.exit_code == 3 and "its plan could not be made (RuntimeError: plan bug)" in planned.output
    assert "Traceback" not in planned.output
