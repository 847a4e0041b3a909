"""compresspipe search on Optuna: SQLite and a real PostgreSQL server, workers, kill and resume, pick, best.yaml."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures import cli

pytest.importorskip("optuna", reason="compresspipe search needs Optuna: pip install 'compresspipe[search]'")

RECIPE = """\
compresspipe: 1
name: s
seed: 0
device: cpu
vars:
  amount: 0.5
model: {builtin: digits-cnn, kwargs: {width: 8, hidden: 32}, input_shape: [1, 8, 8]}
data: {dataset: digits, max_samples: 500, eval_batch_size: 64}
evaluate: {latency: {batch_sizes: [1, 8], warmup: 0, iters: 2}}
deploy: {runtime: onnxruntime, rounds: 3}
gates: {max_accuracy_drop: 0.9}
stages:
  - type: train
    epochs: 2
    lr: 5.0e-3
  - type: prune
    amount: ${vars.amount}
  - type: quantize
    calibration: {batches: 1}
search:
  space:
    vars.amount: {choices: [0.25, 0.5, 0.75]}
  objectives: {accuracy_drop: minimize, bytes: minimize}
  sampler: grid
"""


def _recipe(tmp_path: Path, text: str = RECIPE, **search: object) -> Path:
    data = yaml.safe_load(text)
    data["search"].update(search)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _doc(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


def _spawn(*args: object, cwd: Path) -> subprocess.Popen:
    from compresspipe.run.workers import child_env

    # a shell's background job ignores SIGINT, and a child inherits that: give it Ctrl-C back, as a terminal would
    return subprocess.Popen([sys.executable, "-m", "compresspipe", "search", *map(str, args)], cwd=cwd,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(check, what: str, proc: subprocess.Popen | None = None, limit: float = 600) -> None:
    """Poll until check() holds (a wait, not a timing assertion: the limit only stops a hung test)."""
    end = time.monotonic() + limit
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the search ended before {what}: {proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


def _status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_sqlite_search_with_two_workers_writes_every_output_and_best_yaml_reproduces(tmp_path):
    import torch

    path, out = _recipe(tmp_path), tmp_path / "out"
    result = cli("search", path, "--out", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    doc = _doc(out)
    assert doc["format"] == "compresspipe.search" and doc["version"] == 1 and doc["n_trials"] == 3
    trials = doc["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert sorted(t["params"]["vars.amount"] for t in trials) == [0.25, 0.5, 0.75]  # the grid, once each
    assert (out / "study.db").is_file() and doc["storage"].startswith("sqlite:///")
    for t in trials:  # every trial is an ordinary run folder, with its plain recipe beside it
        folder = out / t["folder"]
        assert _status(folder) == "complete" and (folder / "report.html").is_file()
        plain = yaml.safe_load((folder.with_suffix(".yaml")).read_text())
        assert "search" not in plain and "vars" not in plain
        assert plain["stages"][1]["amount"] == t["params"]["vars.amount"]
        assert t["figures"]["bytes"] == json.loads((folder / "report.json").read_text())["stages"][-1]["bytes"]
    # the third trial could start only after another finished: it took that trial's baseline and train stages
    assert trials[2]["reused"]["stages"] == 2
    assert doc["pareto"] and doc["picked"] == min(trials, key=lambda t: (t["figures"]["accuracy_drop"],
                                                                          t["figures"]["bytes"]))["number"]
    html = (out / "search.html").read_text()
    assert "<svg" in html and "accuracy vs bytes" in html and "<script" not in html
    assert "search: s" in result.output and "pick: trial" in result.output

    # re-pick without running anything
    repick = cli("search", path, "--out", out, "--pick", "minimize=bytes,max_accuracy_drop=0.9")
    assert repick.exit_code == 0, repick.output
    doc = _doc(out)
    smallest = min(doc["trials"], key=lambda t: t["figures"]["bytes"])
    assert len(doc["trials"]) == 3 and doc["picked"] == smallest["number"]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "search" not in best and best["name"] == "s-best" and best["stages"][1]["amount"] == \
        smallest["params"]["vars.amount"]

    # best.yaml is a plain recipe: run it (with the trial's thread count) and verify the run
    previous = torch.get_num_threads()
    torch.set_num_threads(smallest["threads"])
    try:
        ran = cli("run", out / "best.yaml", "--out", tmp_path / "best", "-q")
    finally:
        torch.set_num_threads(previous)
    assert ran.exit_code == 0, ran.output
    report = json.loads((tmp_path / "best" / "report.json").read_text())
    assert report["stages"][-1]["accuracy"] == smallest["figures"]["accuracy"]
    assert report["stages"][-1]["bytes"] == smallest["figures"]["bytes"]
    checked = cli("verify", tmp_path / "best")
    assert checked.exit_code == 0, checked.output


def test_a_killed_or_interrupted_search_resumes_and_loses_no_finished_trial(tmp_path):
    import optuna

    path = _recipe(tmp_path, RECIPE.replace("epochs: 2", "epochs: 4"))
    out = tmp_path / "out"
    first = _spawn(path, "--out", out, cwd=tmp_path)
    _wait_for(lambda: _status(out / "trials" / "0000") == "complete" and (out / "trials" / "0001" / "01-train")
              .is_dir(), "trial 1 to be under way", first)
    first.kill()  # SIGKILL: no handler runs
    first.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    kept = optuna.load_study(study_name="s", storage=storage).trials
    assert kept[0].state.name == "COMPLETE" and kept[1].state.name == "RUNNING"
    values = kept[0].values

    second = _spawn(path, "--out", out, cwd=tmp_path)
    # the killed trial is retried in its own run folder, renamed to the retry's number
    _wait_for(lambda: (out / "trials" / "0002" / "run.json").is_file(), "the retry to start", second)
    assert not (out / "trials" / "0001").exists()
    second.send_signal(signal.SIGINT)  # Ctrl-C
    output = second.communicate()[0].decode()
    assert second.returncode == 130, output
    assert "every finished trial is in the study" in output

    third = cli("search", path, "--out", out)
    assert third.exit_code == 0, third.output
    trials = optuna.load_study(study_name="s", storage=storage).trials
    states = [t.state.name for t in trials]
    # the killed attempt, and the one Ctrl-C interrupted unless it came while that trial was importing a library
    # that swallows it (the worker then stops after the trial, which finished)
    assert states.count("COMPLETE") == 3 and states.count("FAIL") in (1, 2), states
    assert trials[0].values == values  # the trial finished before the kill is untouched
    assert all(t.user_attrs.get("interrupted") for t in trials if t.state.name == "FAIL")
    doc = _doc(out)
    assert [t["state"] for t in doc["trials"]].count("interrupted") == states.count("FAIL")
    resumed = [t for t in doc["trials"] if t.get("retry_of")]
    assert resumed and all(_status(out / t["folder"]) == "complete" for t in doc["trials"] if t["state"] == "complete")
    assert sorted(t["params"]["vars.amount"] for t in doc["trials"] if t["state"] == "complete") == [0.25, 0.5, 0.75]


def test_a_worker_terminated_by_sigterm_leaves_no_running_trial_and_the_other_finishes_the_search(tmp_path):
    """CI cancels one worker (SIGTERM) of two sharing a study: its trial is marked failed, not RUNNING forever, and
    the other worker completes every trial."""
    import optuna

    path, out = _recipe(tmp_path, RECIPE.replace("epochs: 2", "epochs: 6")), tmp_path / "out"
    parent = _spawn(path, "--out", out, "--workers", "2", cwd=tmp_path)

    def running() -> list[Path]:
        return [f for f in (out / "trials").glob("0*") if _status(f) == "running"] if (out / "trials").is_dir() else []

    _wait_for(lambda: len(running()) >= 2, "both workers to run a trial", parent)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
    assert children, "the second worker is a child process"
    os.kill(int(children[0]), signal.SIGTERM)
    output = parent.communicate(timeout=600)[0].decode()
    assert parent.returncode == 0, output
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}").trials
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 3, states
    assert all(t.user_attrs.get("interrupted") for t in trials if t.state.name == "FAIL")


def test_early_stop_prunes_hopeless_trials_and_no_pick_is_exit_1(tmp_path):
    path = _recipe(tmp_path, n_trials=1, early_stop={"after": "prune", "min_mac_reduction": 50})
    out = tmp_path / "out"
    result = cli("search", path, "--out", out)
    assert result.exit_code == 1 and "no trial to pick" in result.output, result.output
    trial = _doc(out)["trials"][0]
    assert trial["state"] == "stopped early" and "stopped early after prune: min_mac_reduction" in trial["stopped"]
    folder = out / trial["folder"]
    assert _status(folder) == "stopped" and (folder / "02-prune").is_dir() and not (folder / "03-quantize").exists()
    assert json.loads((folder / "report.json").read_text())["status"] == "stopped"
    assert not (out / "best.yaml").exists()


def test_an_unreachable_storage_is_exit_2_at_its_line(tmp_path):
    path = _recipe(tmp_path, storage="postgresql://nobody@127.0.0.1:9/none")
    result = cli("search", path, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "storage:" in text)
    assert f"s.yaml:{line}:" in result.output and "search.storage: cannot reach the study storage" in result.output
    assert "Traceback" not in result.output


def test_a_study_belongs_to_one_search_and_pick_needs_trials(tmp_path):
    path, out = _recipe(tmp_path), tmp_path / "out"
    empty = cli("search", path, "--out", out, "--pick", "minimize=bytes")
    assert empty.exit_code == 2 and "has no trials to pick from" in empty.output
    changed = _recipe(tmp_path, space={"vars.amount": {"choices": [0.3, 0.6]}})
    other = cli("search", changed, "--out", out, "--pick", "minimize=bytes")
    assert other.exit_code == 2 and "was made by a different search" in other.output
    bad = cli("search", path, "--out", out, "--pick", "minimize=byts")
    assert bad.exit_code == 2 and "--pick minimize=byts minimize: unknown figure 'byts'; did you mean 'bytes'?" \
        in bad.output


def test_a_journal_file_storage(tmp_path):
    path, out = _recipe(tmp_path, n_trials=1, storage="study.journal"), tmp_path / "out"
    result = cli("search", path, "--out", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "study.journal").is_file() and _doc(out)["storage"].startswith("journal:")
    again = cli("search", path, "--out", out)  # the journal it wrote is its own: the search continues
    assert again.exit_code == 0, again.output


def test_a_storage_file_that_is_not_ours_is_refused_and_left_untouched(tmp_path):
    import sqlite3

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    db = tmp_path / "mine.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE expenses (amount REAL)")
    con.commit()
    con.close()
    (tmp_path / "link.journal").symlink_to(notes)
    before = {p: p.read_bytes() for p in (notes, db)}
    for storage in ("notes.txt", f"sqlite:///{notes}", f"sqlite:///{db}", "link.journal"):
        result = cli("search", _recipe(tmp_path, n_trials=1, storage=storage), "--out", tmp_path / "out")
        assert result.exit_code == 2, (storage, result.output)
        assert "Traceback" not in result.output
        assert {p: p.read_bytes() for p in before} == before, storage
    assert not (tmp_path / "out" / "search.yaml").exists()


def test_a_storage_password_reaches_no_file_message_or_folder(tmp_path, postgres_url, monkeypatch):
    import optuna
    import psycopg

    with psycopg.connect(postgres_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE secrets")  # its own database: the other tests' study list stays theirs
    secret = "s3cr3t-pw"
    url = postgres_url.rsplit("/", 1)[0].replace("compresspipe@", f"compresspipe:{secret}@") + "/secrets"
    path = _recipe(tmp_path, storage=url, study="pw", n_trials=1)
    monkeypatch.chdir(tmp_path)
    result = cli("search", path, "--out", tmp_path / "a")
    assert result.exit_code == 0 and secret not in result.output, result.output
    joined = cli("search", "--join", url, "--out", tmp_path / "b")
    assert joined.exit_code == 0 and secret not in joined.output, joined.output
    # search.yaml keeps the URL without its password: joining by folder takes it from the environment
    monkeypatch.setenv("COMPRESSPIPE_STORAGE_PASSWORD", secret)
    by_folder = cli("search", "--join", tmp_path / "a", "--out", tmp_path / "c")
    assert by_folder.exit_code == 0 and secret not in by_folder.output, by_folder.output
    bad_set = cli("search", path, "--set", f"search.storage={url}", "--set", "search.n_trials=-1")
    assert bad_set.exit_code == 2 and secret not in bad_set.output
    bad_url = cli("search", path, "--out", tmp_path / "d", "--set", f"search.storage=sqlite://u:{secret}@host/x.db")
    assert bad_url.exit_code == 2 and secret not in bad_url.output, bad_url.output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]
    assert not [p for p in tmp_path.rglob("*") if secret in str(p)]
    plain = postgres_url.rsplit("/", 1)[0] + "/secrets"
    study = optuna.load_study(study_name="pw", storage=plain.replace("postgresql://", "postgresql+psycopg://"))
    assert secret not in json.dumps(study.user_attrs, default=str)


def test_two_workers_share_a_postgresql_study_and_another_machine_joins(tmp_path, postgres_url):
    import optuna

    path = _recipe(tmp_path, storage=postgres_url, space={"vars.amount": {"choices": [0.2, 0.4, 0.6, 0.8]}})
    result = cli("search", path, "--out", tmp_path / "a", "--workers", "2")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="s", storage=postgres_url.replace("postgresql://",
                                                                              "postgresql+psycopg://")).trials
    # two workers may race for the last trial: the later-numbered one is surplus and runs nothing
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in ran] == ["COMPLETE"] * 4
    assert all(t.state.name == "FAIL" and "params" not in t.user_attrs and not t.params
               for t in trials if t.user_attrs.get("surplus"))
    assert len({t.user_attrs["pid"] for t in ran}) == 2  # two processes ran them
    doc = _doc(tmp_path / "a")
    assert len(doc["trials"]) == 4
    assert doc["storage"].startswith("postgresql+psycopg://compresspipe@127.0.0.1:")
    # a worker on another machine joins by URL: it reads the search from the study; nothing is left to run,
    # so it writes the outputs from the storage alone
    joined = cli("search", "--join", postgres_url, "--out", tmp_path / "b")
    assert joined.exit_code == 0, joined.output
    assert (tmp_path / "b" / "search.yaml").is_file() and _doc(tmp_path / "b")["picked"] == doc["picked"]
    assert yaml.safe_load((tmp_path / "b" / "best.yaml").read_text()) == \
        yaml.safe_load((tmp_path / "a" / "best.yaml").read_text())
    assert os.path.isdir(tmp_path / "a" / "trials")


def test_workers_racing_for_the_last_trial_run_n_trials_and_the_surplus_one_runs_nothing(tmp_path):
    """Two workers that both see n_trials - 1 counted trials both ask for one; trial numbers come from the storage,
    so the later-numbered one is surplus whatever order they check in: it fails at once, without running, and
    counts nowhere (not in n_trials, not in search.json)."""
    import optuna

    from compresspipe.search.driver import counted
    from compresspipe.search.results import trial_rows
    from compresspipe.search.trial import SurplusTrial, TrialRunner, surplus

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    first = study.ask()
    study.tell(first, 1.0)
    racing = [study.ask(), study.ask()]  # budget 2: both asked while one trial was counted
    assert not surplus(study, racing[0].number, 2) and surplus(study, racing[1].number, 2)
    # the later one is surplus even when it checks first and the earlier one has not finished
    from types import SimpleNamespace

    setup = SimpleNamespace(spec=SimpleNamespace(trials=lambda: 2))  # all a surplus trial reads of its search
    with pytest.raises(SurplusTrial):
        TrialRunner(setup)(racing[1])  # type: ignore[arg-type]
    assert racing[1].user_attrs == {"surplus": True} and racing[1].params == {}
    study.tell(racing[1], state=optuna.trial.TrialState.FAIL)
    study.tell(racing[0], 2.0)
    assert counted(study) == 2
    rows = trial_rows(study.get_trials(), ["accuracy_drop"])
    assert [r["number"] for r in rows] == [0, 1]
    # an interrupted trial does not count either: the one asked after it is not surplus
    interrupted = study.ask()
    interrupted.set_user_attr("interrupted", True)
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    assert counted(study) == 2 and not surplus(study, study.ask().number, 3)


def test_a_trial_left_running_by_a_killed_worker_is_retried_though_it_counts(tmp_path):
    """A local worker killed outright (SIGKILL, or cut short while it told the storage) leaves its trial RUNNING,
    which still counts as one of n_trials: the worker that spawned it retries it when the others have ended,
    judging by what the storage says of that trial (its process is gone, its run folder unlocked), not by the
    count."""
    import socket
    from types import SimpleNamespace

    import optuna

    from compresspipe.search.driver import counted, retry_left_behind

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    for value in (1.0, 2.0):
        done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(done, value)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for key, value in {"host": socket.gethostname(), "pid": dead.pid, "folder": "trials/0002"}.items():
        left.set_user_attr(key, value)
    assert counted(study) == 3  # n_trials 3 looks done: the RUNNING trial counts
    setup = SimpleNamespace(folder=tmp_path, spec=SimpleNamespace(timeout=None))
    assert not retry_left_behind(setup, study, storage, spawned=False)  # only the worker that spawned others
    assert retry_left_behind(setup, study, storage, spawned=True)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[2] == "FAIL" and study.get_trials()[2].user_attrs["interrupted"] is True
    assert "WAITING" in states.values()  # the retry, run next by work()
    assert counted(study) == 3  # the interrupted one no longer counts; its retry does
