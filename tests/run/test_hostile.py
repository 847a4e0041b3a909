"""Hostile and broken inputs, one test per family: nothing lost, nothing hung, nothing fetched, clear errors.

Memory tests run in a subprocess under a 2 GB data limit (RLIMIT_DATA: the heap and anonymous maps; torch's
shared libraries still load): a bound that is missing shows as a MemoryError or a kill, not a slow machine.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from compresspipe.artifacts.files import dumps
from compresspipe.run.folder import RunFolder
from tests.fixtures import cli, install_plugin, run, tiny_recipe, write_recipe

CAP = 2 << 30


def _capped(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, preexec_fn=limit, cwd=cwd,
                          timeout=timeout)


def _cli_capped(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _capped("-m", "compresspipe", *args, cwd=cwd)


# -- data loss and corruption ---------------------------------------------------------------------------------


def test_force_removes_only_what_a_run_wrote(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "-q").exit_code == 0
    assert cli("run", recipe, "--out", out, "-q", "--force").exit_code == 0  # a run's own files: replaced
    # a file, a hidden file, a folder or a link that no run wrote: --force refuses, nothing is removed
    for name, make in [("analysis.md", lambda p: p.write_text("my notes")), (".notes", lambda p: p.write_text("x")),
                       ("plots", lambda p: p.mkdir()), ("link", lambda p: p.symlink_to(tmp_path))]:
        make(out / name)
        before = sorted(p.name for p in out.iterdir())
        refused = cli("run", recipe, "--out", out, "-q", "--force")
        assert refused.exit_code == 2 and name in refused.output and "files no run wrote" in refused.output, \
            refused.output
        assert sorted(p.name for p in out.iterdir()) == before
        (out / name).rmdir() if (out / name).is_dir() and not (out / name).is_symlink() else (out / name).unlink()
    # a run into the working directory, which holds the recipe: refused, with or without --force, nothing removed
    here = tmp_path / "here"
    here.mkdir()
    write_recipe(here, tiny_recipe(stages=[{"type": "train", "epochs": 1}]), "r.yaml")
    for force in ([], ["--force"]):
        done = subprocess.run([sys.executable, "-m", "compresspipe", "run", "r.yaml", "--out", ".", "-q", *force],
                              cwd=here, capture_output=True, text=True)
        assert done.returncode == 2 and "--force removes only what a run writes" in done.stderr, done.stderr
    assert sorted(p.name for p in here.iterdir()) == ["r.yaml"]


def test_force_tells_a_run_s_entries_by_kind_not_only_by_name(tmp_path):
    """Entries named like a run's but not of its kind are a user's: a folder `2024-results` (a stage folder's name,
    no manifest), a link named like a stage folder or a report, a hidden folder or a `.tmp` file of the user's.
    --force refuses and removes nothing; a `.lock` that is a link or a hard link is never written through."""
    recipe = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "-q").exit_code == 0
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    cases = [("2024-results", lambda p: (p.mkdir(), (p / "table.csv").write_text("a,b"))),
             ("05-notes", lambda p: p.mkdir()),
             (".01-train", lambda p: p.mkdir()),
             ("07-link", lambda p: p.symlink_to(out / "01-train", target_is_directory=True)),
             ("report.html", lambda p: (p.unlink(), p.symlink_to(target))),
             (".backup.tmp", lambda p: p.write_text("mine"))]
    for name, make in cases:
        make(out / name)
        before = {p.name: (p.is_symlink(), p.is_dir()) for p in out.iterdir()}
        refused = cli("run", recipe, "--out", out, "-q", "--force")
        assert refused.exit_code == 2 and name in refused.output and "files no run wrote" in refused.output, \
            (name, refused.output)
        assert {p.name: (p.is_symlink(), p.is_dir()) for p in out.iterdir()} == before, name
        entry = out / name
        entry.unlink() if entry.is_symlink() or entry.is_file() else __import__("shutil").rmtree(entry)
    assert target.read_text() == "keep me"
    assert cli("run", recipe, "--out", out, "-q", "--force").exit_code == 0  # only the run's own entries left
    # the lock file as a link to, or a hard link of, a user's file: refused before anything is written through it
    for link in (lambda p: p.symlink_to(target), lambda p: os.link(target, p)):
        (out / ".lock").unlink()
        link(out / ".lock")
        refused = cli("run", recipe, "--out", out, "-q", "--force")
        assert refused.exit_code == 2 and ".lock" in refused.output and "Traceback" not in refused.output, \
            refused.output
        assert target.read_text() == "keep me"


def test_a_second_run_into_a_held_folder_exits_2_naming_the_holder(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    out = tmp_path / "run"
    with RunFolder(out):
        result = cli("run", recipe, "--out", out, "-q")
    assert result.exit_code == 2
    assert "a run is in progress there (pid" in result.output and "Traceback" not in result.output
    assert cli("run", recipe, "--out", out, "-q").exit_code == 0  # released when the holder ends


def test_report_json_is_written_on_every_exit_and_stale_ones_go(tmp_path, monkeypatch):
    from compresspipe.stages.train import stage as train

    recipe = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1},
                                                        {"type": "train", "epochs": 1, "name": "again"}]))
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "-q").exit_code == 0
    calls = []

    def boom(self, state, ctx):
        calls.append(ctx.name)
        if ctx.name == "again":
            raise RuntimeError("kaboom")
        return real(self, state, ctx)

    real = train.TrainStage.run
    monkeypatch.setattr(train.TrainStage, "run", boom)
    failed = cli("run", recipe, "--out", out, "-q", "--force", "--json")
    assert failed.exit_code == 3
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "kaboom" in report["error"]
    assert [s["name"] for s in report["stages"]] == ["baseline", "train"]  # the finished stages
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert '"status": "failed"' in failed.stdout  # --json prints the report of a failed run too

    def interrupt(self, state, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.TrainStage, "run", interrupt)
    stopped = cli("run", recipe, "--out", out, "-q", "--force")
    assert stopped.exit_code == 130
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_our_json_is_strict_and_our_files_are_readable_by_others(tmp_path):
    assert json.loads(dumps({"loss": float("nan"), "x": [float("inf"), 1.0]})) == {"loss": None, "x": [None, 1.0]}
    old = os.umask(0o022)
    try:
        run(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    finally:
        os.umask(old)
    for name in ("report.json", "report.html", "run.json", "01-train/model.safetensors"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


# -- memory blow-ups and hangs from small inputs ----------------------------------------------------------------


def test_alias_and_variable_bombs_are_refused_under_a_memory_cap(tmp_path):
    big = "x" * (1 << 20)
    aliases = "compresspipe: 1\nname: bomb\nbig: &b " + big + "\nrefs: [" + ", ".join(["*b"] * 50_000) + "]\n"
    (tmp_path / "alias.yaml").write_text(aliases)
    used = tiny_recipe(vars={"x": "y" * (1 << 20)})
    used["notes"] = ["${vars.x}"] * 3000
    write_recipe(tmp_path, used, "vars.yaml")
    for name in ("alias.yaml", "vars.yaml"):
        done = _cli_capped("validate", str(tmp_path / name))
        assert done.returncode == 2, (name, done.stderr[-500:])
        assert "larger than" in done.stderr or "expands to more than" in done.stderr
    done = _cli_capped("validate", "/dev/zero")
    assert done.returncode == 2 and "not a regular file" in done.stderr


def test_verify_reads_a_bombed_lock_file_within_bounds(tmp_path):
    out = run(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}])).folder
    lock = out / "recipe.lock.yaml"
    lock.write_text("a: &a [" + ", ".join(["x"] * 100) + "]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 100) + "]\n" for p, c in zip("abcdef", "bcdefg", strict=True)))
    done = _cli_capped("verify", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "recipe.lock.yaml" in done.stderr


def test_a_model_json_that_claims_huge_tensors_is_refused_before_allocating(tmp_path):
    from compresspipe.artifacts.model import ModelState, save_model
    from compresspipe.models.factory import build_model

    state = ModelState(build_model({"builtin": "digits-mlp", "kwargs": {"hidden": 8}}),
                       {"builtin": "digits-mlp", "kwargs": {"hidden": 8}}, (1, 8, 8), 10)
    save_model(state, tmp_path / "m")
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    desc["edits"] = [{"kind": "resize", "version": 1,
                      "modules": {"fc1": {"tensors": {"weight": [100000, 100000]}, "attrs": {}}}}]
    (tmp_path / "m" / "model.json").write_text(json.dumps(desc))
    code = ("from pathlib import Path; from compresspipe.artifacts.model import load_model\n"
            f"try:\n    load_model(Path({str(tmp_path / 'm')!r}))\nexcept Exception as e:\n    print(type(e).__name__, e)")
    done = _capped("-c", code)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.startswith("ArtifactError") and "[100000, 100000]" in done.stdout


def test_a_deflate_bomb_checkpoint_is_refused(tmp_path):
    import zipfile

    bomb = tmp_path / "w.pt"
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("archive/data/0", "w") as fh:
        for _ in range(256):  # 256 MB of zeros in a few hundred KB
            fh.write(chunk)
    recipe = write_recipe(tmp_path, tiny_recipe(model={"builtin": "digits-mlp", "checkpoint": "w.pt",
                                                       "input_shape": [1, 8, 8]}))
    done = _cli_capped("run", str(recipe), "--out", str(tmp_path / "run"), "-q")
    assert done.returncode == 2 and "refusing a compressed archive" in done.stderr


# -- our own files, tampered or broken ------------------------------------------------------------------------


@pytest.mark.parametrize("tamper,message", [
    (lambda d: d.pop("source"), "source"),
    (lambda d: d.update(edits={"kind": "resize"}), "edits"),
    (lambda d: d.update(input_shape=[1, -8, 8]), "input_shape"),
    (lambda d: d.update(version=True), "version"),
    (lambda d: d.update(source={"torchvision": "resnet18", "kwargs": {"weights": "DEFAULT"}}),
     "would download weights"),
    (lambda d: d.update(edits=[{"kind": "resize", "version": 1,
                                "modules": {"fc1": {"attrs": {"forward": 3}}}}]), "not an int or int-tuple"),
    (lambda d: d.update(edits=[{"kind": "replace", "version": 1, "module": "fc1",
                                "layer": {"type": "Linear", "kwargs": {"in_features": 64, "out_features": 8,
                                                                       "device": "meta"}}}]), "not device"),
    (lambda d: d.update(edits=[{"kind": "replace", "version": 1, "module": "fc1",
                                "layer": {"type": "Sequential", "children": [["a.b", {"type": "ReLU"}]]}}]),
     "not a module name"),
    (lambda d: d.update(edits=[{"kind": "resize", "version": 1, "modules": {"fc1": {"tensors": {}}}}] * 2
                        + [json.loads("[" * 900 + "]" * 900)]), "edits"),
])
def test_a_tampered_model_json_is_a_clear_error_naming_file_and_key(tmp_path, tamper, message):
    from compresspipe.artifacts.model import load_model
    from compresspipe.errors import ArtifactError

    folder = run(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}])).folder / "01-train"
    desc = json.loads((folder / "model.json").read_text())
    tamper(desc)
    (folder / "model.json").write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match=message) as caught:
        load_model(folder)
    assert str(folder / "model.json") in str(caught.value)


def test_resume_over_a_tampered_stage_names_the_folder_not_the_next_stage(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "train", "epochs": 1, "name": "again"}])
    out = run(tmp_path, recipe).folder
    (out / "02-again").rename(out / ".02-again.partial")  # as if interrupted in the second stage
    desc = json.loads((out / "01-train" / "model.json").read_text())
    desc["num_classes"] = "ten"
    (out / "01-train" / "model.json").write_text(json.dumps(desc))
    manifest = json.loads((out / "01-train" / "manifest.json").read_text())  # a careful forger fixes the hash
    import hashlib

    manifest["files"]["model.json"]["sha256"] = hashlib.sha256((out / "01-train" / "model.json").read_bytes()).hexdigest()
    (out / "01-train" / "manifest.json").write_text(json.dumps(manifest))
    result = cli("run", tmp_path / "run.yaml", "--out", out, "-q", "--resume")
    assert result.exit_code in (2, 3) and "Traceback" not in result.output
    assert "01-train/model.json: num_classes" in " ".join(result.output.split())


@pytest.mark.parametrize("target,content", [
    ("report.json", "[1, 2]"), ("report.json", '{"format": "compresspipe.report", "stages": [{"folder": "../.."}]}'),
    ("recipe.lock.yaml", "!!python/object/apply:os.system ['true']"), ("recipe.lock.yaml", "format: nope"),
    ("01-train/manifest.json", '{"files": {"../../etc/passwd": {"sha256": "0"}}}'),
    ("01-train/manifest.json", '{"files": []}'),
])
def test_verify_on_broken_run_files_is_exit_2_without_a_traceback(tmp_path, target, content):
    out = run(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}])).folder
    (out / target).write_text(content)
    result = cli("verify", out, "--fast")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content", [
    "[]", '{"format": "compresspipe.report", "version": true, "stages": []}',
    '{"format": "compresspipe.report", "version": 2, "stages": [1]}',
    '{"format": "compresspipe.report", "version": 2, "stages": [{"name": "a", "accuracy": "high", '
    '"latency_ms": [1]}]}',
    "NaN" * 10, "\xff\xfe",
])
def test_compare_on_a_tampered_report_is_a_clear_error(tmp_path, content):
    good = run(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}])).folder
    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("utf-8", "surrogateescape") if content != "\xff\xfe" else b"\xff\xfe")
    result = cli("compare", good, bad)
    assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output


def test_output_locations_that_cannot_work_are_exit_2_before_anything_runs(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, Path("/dev/null")):
        result = cli("run", recipe, "--out", out, "-q")
        assert result.exit_code == 2 and "is a file" in result.output, result.output
    (tmp_path / "junit").mkdir()
    result = cli("run", recipe, "--out", tmp_path / "r", "-q", "--junit", tmp_path / "junit")
    assert result.exit_code == 2 and "--junit" in result.output and not (tmp_path / "r").exists()
    long = write_recipe(tmp_path, tiny_recipe(name="n" * 300), "long.yaml")
    assert cli("validate", long).exit_code == 2


# -- exit codes that keep their promise, and small things ---------------------------------------------------------


def test_recipe_values_that_would_crash_later_are_exit_2_now(tmp_path):
    for bad in (tiny_recipe(seed=2**64), tiny_recipe(name="tiny\n")):
        result = cli("validate", write_recipe(tmp_path, bad))
        assert result.exit_code == 2 and "Traceback" not in result.output
    (tmp_path / "full.yaml").write_text(Path(write_recipe(tmp_path, tiny_recipe(), "base.yaml")).read_text()
                                        + "extends: /etc/passwd\n")
    result = cli("validate", tmp_path / "full.yaml")
    assert result.exit_code == 2 and "is not a recipe" in result.output


def test_terminal_escapes_in_a_recipe_key_are_shown_escaped(tmp_path):
    path = tmp_path / "esc.yaml"
    path.write_text(Path(write_recipe(tmp_path, tiny_recipe(), "base.yaml")).read_text()
                    + '"\\e[2K\\rok: fine\\e[8m": 1\n')
    result = cli("validate", path)
    assert result.exit_code == 2 and "\x1b" not in result.output and "\\x1b[2K" in result.output


# -- signals CI sends -----------------------------------------------------------------------------------------------

# A stage that waits until a signal stops it: in every process (`all`), or only in the search workers a search
# starts itself (`spawned`, whose command line has --worker-index), so a test knows which worker holds which trial.
HOLD_PLUGIN = '''
import sys
import time
from typing import ClassVar, Literal
from compresspipe.recipe.spec import StageConfig
from compresspipe.stages.base import Stage, StageResult


class HoldConfig(StageConfig):
    """Wait until a signal arrives (a test plugin)."""

    type: Literal["hold"]
    who: Literal["all", "spawned"] = "all"
    implementation: ClassVar[str] = "cp_hold_plugin:HoldStage"


class HoldStage(Stage[HoldConfig]):
    def run(self, state, ctx):
        while self.config.who == "all" or "--worker-index" in sys.argv:
            time.sleep(0.05)
        return StageResult(state=state, kind="weights")
'''


def _held_search(tmp_path: Path, who: str) -> tuple[Path, dict[str, str]]:
    """A two-trial search whose second stage holds (see HOLD_PLUGIN); returns the recipe and the env to run it."""
    env = install_plugin(tmp_path, "cp_hold_plugin", HOLD_PLUGIN,
                         "[compresspipe.stages]\nhold = cp_hold_plugin:HoldConfig\n")
    recipe = tiny_recipe(name="s", vars={"epochs": 1},
                         stages=[{"type": "train", "epochs": "${vars.epochs}"}, {"type": "hold", "who": who}],
                         search={"space": {"vars.epochs": {"choices": [1, 2]}}, "objectives": {"bytes": "minimize"},
                                 "sampler": "grid"})
    return write_recipe(tmp_path, recipe, "s.yaml"), env


def _until(check, what: str, proc: subprocess.Popen, limit: float = 300) -> None:
    """Poll until check() holds (the limit only stops a hung test; no timing is asserted)."""
    import time

    end = time.monotonic() + limit
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended before {what}: {proc.communicate()[0][-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def _trial_runs(out: Path) -> dict[Path, dict]:
    runs = {}
    for state in (out / "trials").glob("*/run.json"):
        try:
            runs[state.parent] = json.loads(state.read_text())
        except ValueError:  # pragma: no cover - written atomically; never half a file
            raise AssertionError(f"{state}: half-written") from None
    return runs


def _in_hold(out: Path, spawned_by: int | None = None) -> list[dict]:
    """run.json of the trials whose worker is in the hold stage (the train stage finished, the run goes on); with
    spawned_by, only those of the workers that process started (the first worker's own trial does not hold)."""
    return [r for f, r in _trial_runs(out).items() if r.get("status") == "running" and (f / "01-train").is_dir()
            and r.get("pid") != spawned_by]


def test_a_second_signal_during_cleanup_is_ignored():
    """CI signals a whole process group, and a search's first worker forwards SIGTERM to the others: a worker gets
    two. The second must not cut short the cleanup the first started (the trial's report, its state in the study)."""
    from compresspipe import errors
    from compresspipe.cli import _on_signal
    from compresspipe.search.driver import _Stop

    before = errors._INTERRUPTED
    try:
        for handler in (_on_signal, _Stop.handler):
            errors._INTERRUPTED, _Stop.asked = None, False
            with pytest.raises(KeyboardInterrupt):
                handler(15, None)
            assert errors.interrupt_exit_code() == 143 and "SIGTERM" in errors.interruption()
            try:
                handler(15, None)
                handler(2, None)
            except KeyboardInterrupt:  # (as an assertion: a KeyboardInterrupt would stop the whole test session)
                raise AssertionError(f"{handler.__qualname__}: a second signal interrupted the cleanup") from None
            # ignored; the first signal still counts
            assert errors.interrupt_exit_code() == 143
    finally:
        errors._INTERRUPTED, _Stop.asked = before, False


def _search_in_its_own_group(path, out, env, cwd) -> subprocess.Popen:
    """`compresspipe search --workers 2` in a new process group (what a CI runner starts and then signals)."""
    return subprocess.Popen([sys.executable, "-m", "compresspipe", "search", str(path), "--out", str(out),
                             "--workers", "2", "-q"], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_sigterm_to_a_search_s_process_group_leaves_every_trial_interrupted_and_none_running(tmp_path):
    """What CI does when it cancels a job: SIGTERM to every process of the search at once (the first worker then
    forwards one more to the other). Exit 143, no traceback, no trial RUNNING in the study, and every trial's run
    folder says `interrupted` in run.json and report.json."""
    optuna = pytest.importorskip("optuna")
    import signal

    path, env = _held_search(tmp_path, "all")
    out = tmp_path / "out"
    proc = _search_in_its_own_group(path, out, env, tmp_path)
    try:
        _until(lambda: len(_in_hold(out)) == 2, "both workers to hold a trial", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output
    assert "SIGTERM" in output and "Traceback" not in output
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}").trials
    assert len(trials) == 2 and all(t.state.name == "FAIL" and t.user_attrs.get("interrupted") for t in trials), \
        [(t.state.name, t.user_attrs) for t in trials]
    for folder, state in _trial_runs(out).items():
        report = json.loads((folder / "report.json").read_text())
        assert state["status"] == report["status"] == "interrupted" and "SIGTERM" in report["error"], folder


def test_a_search_worker_terminated_after_the_others_finished_has_its_trial_run_again(tmp_path):
    """One worker of two is sent SIGTERM while the first worker, its share done, waits for it: the trial it held is
    marked interrupted (never RUNNING forever), and the first worker runs it again, so the search still ends with
    its trials complete and exit 0."""
    optuna = pytest.importorskip("optuna")
    import signal

    path, env = _held_search(tmp_path, "spawned")
    out = tmp_path / "out"
    proc = _search_in_its_own_group(path, out, env, tmp_path)

    def waiting_for_the_other() -> bool:  # the first worker's trial is complete and it waits for its child process
        done = any(r.get("status") == "complete" for r in _trial_runs(out).values())
        try:
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text().strip()
        except OSError:
            wchan = ""
        return done and (wchan == "do_wait" or wchan in ("", "0"))  # where the kernel hides it, the trial suffices

    try:
        _until(lambda: len(_in_hold(out, proc.pid)) == 1, "the spawned worker to hold its trial", proc)
        _until(waiting_for_the_other, "the first worker to finish its trial", proc)
        holding = _in_hold(out, proc.pid)
        assert len(holding) == 1, (_trial_runs(out), proc.poll())
        held = holding[0]["pid"]
        os.kill(held, signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}").trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states and "WAITING" not in states, states
    assert all(t.user_attrs.get("interrupted") for t in trials if t.state.name == "FAIL")
    retry = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("retry_of")]
    assert len(retry) == 1 and retry[0].params == next(t.params for t in trials if t.state.name == "FAIL")


def test_sigterm_to_a_data_parallel_run_is_exit_143_and_its_reports_say_interrupted(tmp_path):
    """`run --nproc 2`: torch's launcher receives the signal and passes it on to the ranks. Exit 143 as without
    --nproc (not a traceback of torch's SignalException), report.json and run.json say `interrupted`."""
    import signal

    env = install_plugin(tmp_path, "cp_hold_plugin", HOLD_PLUGIN,
                         "[compresspipe.stages]\nhold = cp_hold_plugin:HoldConfig\n")
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "hold"}]))
    out = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "compresspipe", "run", str(path), "--out", str(out), "--nproc",
                             "2", "-q"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _until(lambda: (out / "01-train" / "manifest.json").is_file(), "the first stage to finish", proc)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output and "SIGTERM" in output, output[-3000:]
    state, report = (json.loads((out / name).read_text()) for name in ("run.json", "report.json"))
    assert state["status"] == report["status"] == "interrupted" and "SIGTERM" in report["error"]
    assert (out / "01-train" / "manifest.json").is_file() and not (out / "02-hold").exists()


def test_an_error_raised_while_a_signal_unwinds_is_the_interrupt_not_a_traceback(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) that lands in an import can leave a module half-imported; the next line then fails with
    an AttributeError (torch's first use_deterministic_algorithms imports sympy). That error is the interrupt:
    exit 143, run.json and report.json `interrupted`, no traceback."""
    import torch

    from compresspipe import errors

    monkeypatch.setattr(errors, "_INTERRUPTED", None)

    def cut_short(*args: object, **kwargs: object) -> None:
        errors.mark_interrupted(15)
        raise AttributeError("module 'sympy' has no attribute 'logic'")

    monkeypatch.setattr(torch, "use_deterministic_algorithms", cut_short)
    path = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "train", "epochs": 1}]))
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "-q")
    assert result.exit_code == 143 and "SIGTERM" in result.output and "Traceback" not in result.output, \
        result.output
    state, report = (json.loads((out / name).read_text()) for name in ("run.json", "report.json"))
    assert state["status"] == report["status"] == "interrupted" and "SIGTERM" in report["error"]


def test_sigterm_to_one_sensitivity_worker_stops_the_command_as_sigterm_and_leaves_no_scratch(tmp_path):
    """A worker of `sensitivity --workers 2` alone is sent SIGTERM: the command stops as if it had been (exit 143,
    no traceback, run it again to continue), not `a sensitivity worker failed`, and leaves no scratch files."""
    import signal

    from tests.fixtures import CNN

    recipe = tiny_recipe(model=CNN, data={"dataset": "digits", "max_samples": 400, "eval_batch_size": 64},
                         stages=[{"type": "train", "epochs": 1, "lr": 3e-3}, {"type": "prune", "amount": 0.5}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "sens"
    proc = subprocess.Popen([sys.executable, "-m", "compresspipe", "sensitivity", str(path), "--out", str(out),
                             "--workers", "2", "--ratios", "0.3,0.6", "--samples", "64", "-q"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def worker() -> int | None:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return next((int(c) for c in children
                         if b"compresspipe.sensitivity.worker" in Path(f"/proc/{c}/cmdline").read_bytes()), None)
        except OSError:
            return None

    try:
        found: list[int] = []
        _until(lambda: bool(found.append(worker() or 0) or found[-1]), "a sensitivity worker to start", proc)
        os.kill(found[-1], signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "SIGTERM" in output and "Traceback" not in output, output[-3000:]
    assert not [p.name for p in out.rglob(".*") if p.name.startswith((".part-", ".scratch-"))]
