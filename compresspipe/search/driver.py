"""Workers of a search: this process, `--workers N` local processes, and workers on other machines (`--join`).

Every worker runs Optuna's `study.optimize` one trial at a time until the study holds `n_trials` trials (all
workers together; a trial that failed on an error counts, one that was interrupted does not: it is retried) or
its own `timeout` has passed. Optuna records each finished trial in the storage as it ends, so Ctrl-C or a kill
loses only the trials in progress. Those are retried when the search runs again: a trial interrupted by Ctrl-C
or SIGTERM is marked so; one whose worker was killed outright is found by its run folder's lock, which no live
process holds (on other machines, Optuna's heartbeat fails it after a grace period). The retry continues in the
interrupted trial's run folder with `--resume`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from compresspipe.artifacts.files import atomic_write_text
from compresspipe.errors import CompressPipeError, InputError, mark_interrupted
from compresspipe.errors import interrupted as was_interrupted
from compresspipe.recipe.compose import PATH_KEYS
from compresspipe.recipe.yamlio import dump_yaml
from compresspipe.run.workers import child_env
from compresspipe.search import results
from compresspipe.search.study import create_study, make_sampler, open_storage, redacted, storage_url
from compresspipe.search.trial import SearchSetup, TrialRunner, counts

if TYPE_CHECKING:
    import optuna

    from compresspipe.recipe.loader import LoadedRecipe
    from compresspipe.ui import UI

SEARCH_RECIPE = "search.yaml"


@dataclass
class SearchOptions:
    out: Path | None = None
    workers: int = 1
    threads: int | None = None  # torch threads per worker; default: torch's own with one worker, else a share
    pick: dict[str, Any] | None = None  # re-pick only, run no trial
    force: bool = False
    worker_index: int = 0  # offsets the sampler's seed; 0 for the worker that started the search
    spawn: bool = True  # start workers - 1 more local processes (False in the processes it starts)
    joined: bool = False


@dataclass
class SearchResult:
    folder: Path
    doc: dict[str, Any]
    interrupted: bool = False


def absolute_paths(data: Any, base: Path) -> Any:
    """Relative `checkpoint:`/`path:` values (and a journal storage) made absolute against the recipe's folder, so
    trial recipes written elsewhere find the same files."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key in PATH_KEYS and isinstance(value, str) and value and "${" not in value \
                    and not Path(value).expanduser().is_absolute():
                out[key] = str(base / value)
            else:
                out[key] = absolute_paths(value, base)
        search = out.get("search")
        if isinstance(search, dict) and isinstance(search.get("storage"), str) and "://" not in search["storage"] \
                and not Path(search["storage"]).is_absolute():
            search["storage"] = str(base / search["storage"])
        return out
    if isinstance(data, list):
        return [absolute_paths(v, base) for v in data]
    return data


def setup_from(loaded: LoadedRecipe, folder: Path | None) -> SearchSetup:
    recipe = loaded.recipe
    if recipe.search is None:
        raise InputError("the recipe has no search block: add search: {space: ..., objectives: ...} (see the README), "
                         "or run it with compresspipe run")
    if not recipe.stages:
        raise InputError("a search needs stages to run")
    raw = absolute_paths(loaded.raw, loaded.base_dir)
    search = raw.get("search")
    if isinstance(search, dict) and isinstance(search.get("storage"), str):  # what is stored or shown: no password
        raw = {**raw, "search": {**search, "storage": redacted(search["storage"])}}
    return SearchSetup(recipe, raw, (folder or Path("runs") / f"{recipe.name}-search").resolve(), loaded.base_dir)


def _open(setup: SearchSetup, loaded: LoadedRecipe | None, options: SearchOptions,
          ) -> tuple[optuna.Study, optuna.storages.BaseStorage, str]:
    """The study of this search (created on first use); an unreachable storage is a problem at search.storage."""
    spec = setup.spec
    url = storage_url(spec.storage, setup.folder)
    try:
        storage = open_storage(url)
    except InputError as exc:
        if loaded is not None and spec.storage is not None:
            raise loaded.error(("search", "storage"), str(exc)) from None
        raise
    sampler = make_sampler(spec, spec.seed if spec.seed is not None else setup.recipe.seed, options.worker_index)
    study = create_study(storage, spec.study or setup.recipe.name, spec, setup.raw, sampler, force=options.force)
    return study, storage, redacted(url)


def counted(study: optuna.Study) -> int:
    """Trials that count against n_trials: all but the interrupted ones (their retry counts instead) and the
    surplus ones (asked for by racing workers; they ran nothing)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if counts(t))


def recover(setup: SearchSetup, study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Retry the trials a Ctrl-C, SIGTERM or kill interrupted on this machine; returns their numbers.

    A running trial whose run folder's lock no process holds lost its worker: it is marked interrupted and failed
    first. Under a lock of its own, so two workers starting at once do not retry a trial twice."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from compresspipe.search.study import MAX_RETRY, experimental_features

    host = socket.gethostname()
    setup.folder.mkdir(parents=True, exist_ok=True)
    retried: list[int] = []
    with FileLock(setup.folder / ".recover.lock"):
        trials = study.get_trials(deepcopy=False)
        done = {int(n) for t in trials for n in (t.system_attrs.get("retry_history") or [])}
        study_id = storage.get_study_id_from_name(study.study_name)
        for t in trials:
            if t.user_attrs.get("host") != host or t.number in done:
                continue
            if t.state == TrialState.RUNNING and not _alive(t.user_attrs.get("pid")) \
                    and _abandoned(setup.folder / str(t.user_attrs.get("folder") or "")):
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                try:
                    storage.set_trial_user_attr(trial_id, "interrupted", True)
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)
                except Exception:  # another worker (or Optuna's heartbeat) finished it first
                    continue
            elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
                continue
            with experimental_features():
                RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(
                    storage.get_trial_id_from_study_id_trial_number(study_id, t.number)))
            retried.append(t.number)
    return retried


def retry_left_behind(setup: SearchSetup, study: optuna.Study, storage: optuna.storages.BaseStorage,
                      spawned: bool) -> bool:
    """After the local workers this one spawned have ended: whether one of them left a trial to retry here, in its
    run folder, so the search still ends with n_trials. A worker sent SIGTERM leaves its trial failed as
    interrupted; one killed outright (SIGKILL, or cut short while it told the storage) leaves it RUNNING, which
    still counts as one of n_trials: so the study is not judged by its count but by what `recover` finds."""
    return spawned and setup.spec.timeout is None and bool(recover(setup, study, storage))


def _alive(pid: object) -> bool:
    """Whether the worker process that runs a trial on this machine still lives (a zombie does not).

    Between starting a trial and locking its run folder a worker spends seconds (seeding the folder, loading the
    data, building the model): a worker that starts meanwhile must not take that trial for abandoned."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _abandoned(folder: Path) -> bool:
    """Whether no process holds the run folder's lock (its worker is gone); False where there is no folder yet."""
    lock = folder / ".lock"
    if not lock.is_file():
        return not folder.exists() or not any(folder.iterdir())
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


class _Stop:
    """Ctrl-C or SIGTERM asked this worker to stop. The signal raises KeyboardInterrupt where the trial is; should a
    library swallow it (one that arrives during an import can be), the worker still stops after that trial."""

    asked = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        if cls.asked:  # a second signal (CI signals the whole group, then this worker's parent forwards one) must
            return  # not cut the cleanup of the first in half: the trial's report, its state in the study
        cls.asked = True
        mark_interrupted(signum)  # the run in progress then reads an error raised while this unwinds as the interrupt
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> dict[int, Any]:
        cls.asked = False
        return {s: signal.signal(s, cls.handler) for s in (signal.SIGINT, signal.SIGTERM)}


def work(setup: SearchSetup, study: optuna.Study, options: SearchOptions, ui: UI) -> int:
    """Run trials until the study has n_trials or this worker's timeout passes; returns the trials run here."""
    import torch

    spec = setup.spec
    if options.threads is not None or options.workers > 1:
        torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 1) // options.workers))
    runner = TrialRunner(setup)
    start, ran = time.monotonic(), 0
    while counted(study) < spec.trials() or _waiting(study):  # a waiting trial is a retry: it counts, and runs
        if _Stop.asked:
            raise KeyboardInterrupt
        if spec.timeout is not None and time.monotonic() - start > spec.timeout:
            ui.log(f"worker {options.worker_index}: timeout of {spec.timeout:g} s reached")
            break
        runner.last = None
        study.optimize(runner, n_trials=1, catch=(CompressPipeError,))
        ran += 1
        if runner.last is not None:
            ui.log(_line(next(t for t in study.get_trials(deepcopy=False) if t.number == runner.last), spec))
    return ran


def _waiting(study: optuna.Study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _line(trial: optuna.trial.FrozenTrial, spec: Any) -> str:
    state = results.STATE_NAMES.get(trial.state.name, trial.state.name.lower())
    figures = trial.user_attrs.get("figures") or {}
    shown = ", ".join(f"{o} {results._fmt(o, figures.get(o))}" for o in spec.objectives) if figures else ""
    why = trial.user_attrs.get("stopped") or trial.user_attrs.get("error") or ""
    return f"trial {trial.number} {state}" + (f": {shown}" if shown else "") + (f" ({why[:200]})" if why else "")


def _spawn(setup: SearchSetup, options: SearchOptions, count: int) -> list[subprocess.Popen]:
    """`count` local workers joining this search folder, each in its own process with its share of the cores."""
    threads = options.threads or max(1, (os.cpu_count() or 1) // max(options.workers, 1))
    env = child_env(threads)
    procs = []
    for i in range(1, count + 1):
        index = options.worker_index + i
        argv = [sys.executable, "-m", "compresspipe", "search", "--join", str(setup.folder), "--worker-index", str(index),
                "--threads", str(threads), "--workers", str(options.workers), "--no-outputs", "-q"]
        procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL))
    return procs


def run_search(setup: SearchSetup, loaded: LoadedRecipe | None, options: SearchOptions, ui: UI,
               write_outputs: bool = True) -> SearchResult:
    """Run (or continue, or join) a search; with options.pick, only re-pick from the finished trials."""
    setup.folder.mkdir(parents=True, exist_ok=True)
    study, storage, where = _open(setup, loaded, options)
    if options.pick is not None:
        doc = results.build(setup, study, where, options.pick)
        if not doc["trials"]:
            raise InputError(f"study {study.study_name!r} in {where} has no trials to pick from: run the search first")
        results.write(setup, doc)
        return SearchResult(setup.folder, doc)
    if not options.joined:
        atomic_write_text(setup.folder / SEARCH_RECIPE, "# the search recipe (what --join DIR reads)\n"
                          + dump_yaml(setup.raw))
    retried = recover(setup, study, storage)
    if retried:
        ui.log(f"resuming: trial(s) {', '.join(map(str, retried))} were interrupted and are run again")
    done = counted(study)
    if done and options.worker_index == 0:
        ui.log(f"continuing study {study.study_name!r} in {where}: {done} of {setup.spec.trials()} trial(s) there")
    previous = _Stop.install()
    procs: list[subprocess.Popen] = []
    interrupted = False
    try:
        procs = _spawn(setup, options, options.workers - 1) if options.workers > 1 and options.spawn else []
        work(setup, study, options, ui)
        for p in procs:
            p.wait()
        if retry_left_behind(setup, study, storage, bool(procs)):
            work(setup, study, options, ui)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and not was_interrupted():
            raise
        interrupted = True  # also an error raised while the signal unwinds (a library cut short in an import)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    written: dict[str, Any] = {}
    if write_outputs:
        written = results.build(setup, study, where)
        results.write(setup, written)
    return SearchResult(setup.folder, written, interrupted)


def join_setup(target: str, study_name: str | None, out: Path | None) -> tuple[SearchSetup, LoadedRecipe]:
    """The search a `--join` worker works on: a search folder (its search.yaml), or a storage URL (the search recipe
    stored with the study, written to this machine's search folder)."""
    from compresspipe.recipe.loader import load_recipe_source
    from compresspipe.search.study import load_joined

    folder = Path(target)
    if "://" not in target:
        if not (folder / SEARCH_RECIPE).is_file():
            raise InputError(f"--join {target}: not a search folder (no {SEARCH_RECIPE}); give a search folder or "
                             "the storage URL of the study")
        loaded = load_recipe_source(folder / SEARCH_RECIPE)
        return setup_from(loaded, folder), loaded
    url = storage_url(target, Path("."))
    _, name, raw = load_joined(url, study_name)
    raw = dict(raw)
    raw["search"] = {**(raw.get("search") or {}), "storage": redacted(target), "study": name}
    local = (out or Path("runs") / f"{raw.get('name', name)}-search").resolve()
    local.mkdir(parents=True, exist_ok=True)
    path = local / SEARCH_RECIPE
    atomic_write_text(path, f"# joined from {redacted(url)}, study {name}\n" + dump_yaml(raw))
    loaded = load_recipe_source(path)
    return setup_from(loaded, local), loaded
