"""Where a study lives, which sampler drives it, and which search it belongs to.

Storage: `None` is SQLite in the search folder; a string with `://` is an SQLAlchemy URL (a PostgreSQL server lets
several machines share one study; `postgresql://` uses psycopg 3 when psycopg2 is not installed); anything else is
the path of an Optuna journal file (one file on a shared file system). RDB storages run Optuna's heartbeat, so a
trial whose worker died is failed and retried by `RetryFailedTrialCallback` wherever a worker notices it.

Nothing here pickles: the RDB and journal storages keep parameters, attributes and distributions as JSON, and the
samplers offered (TPE, NSGA-II, grid, random) keep their state there as JSON too (CMA-ES, which pickles its state
into the study, is not offered).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compresspipe.errors import InputError

if TYPE_CHECKING:
    import optuna

    from compresspipe.recipe.search import SearchSpec

log = logging.getLogger(__name__)

HEARTBEAT_S = 30
MAX_RETRY = 3
GRACE_S = 150
STUDY_ATTR = "compresspipe.search"
# search settings that may change between invocations of the same search (more trials, another pick)
MUTABLE = ("n_trials", "timeout", "pick", "storage", "study")


PASSWORD_ENV = "COMPRESSPIPE_STORAGE_PASSWORD"


def storage_url(storage: str | None, folder: Path) -> str:
    """The storage as Optuna takes it: an SQLAlchemy URL, or `journal:` and a file path.

    A URL written without its password (or with `***`, as compresspipe stores it) takes the password from the
    environment variable COMPRESSPIPE_STORAGE_PASSWORD, so no file needs to hold it."""
    if storage is None:
        return f"sqlite:///{(folder / 'study.db').resolve()}"
    if "://" in storage:
        storage = _with_password(storage)
        if storage.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
                and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + storage[len("postgresql://"):]
        return storage
    return f"journal:{storage}"


def _with_password(url: str) -> str:
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        return url
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # not an SQLAlchemy URL: open_storage says so
        return url
    if parsed.username and parsed.password in (None, "", "***"):
        return parsed.set(password=password).render_as_string(hide_password=False)
    return url


def redacted(url: str) -> str:
    """The URL without its password, for files and messages."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: say it as it is, minus anything between : and @
        head, _, rest = url.partition("://")
        creds, at, host = rest.rpartition("@")
        return f"{head}://{creds.split(':')[0]}:***@{host}" if at and ":" in creds else url


@contextlib.contextmanager
def experimental_features() -> Iterator[None]:
    """Optuna calls the heartbeat and its retry callback experimental: our choice, not the user's, so its
    ExperimentalWarning is logged at debug level rather than shown; other warnings pass through."""
    import optuna

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, optuna.exceptions.ExperimentalWarning):
            log.debug("optuna: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Connect to the storage (creating its tables or file); InputError, saying why, where it cannot be reached."""
    import optuna

    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):])
            if path.is_dir():
                raise InputError(f"journal storage {path}: is a folder; give a file path")
            _ours_or_new(path, _is_journal, "an Optuna journal")
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        engine: dict[str, Any] = {}
        if url.startswith("postgresql"):
            engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        elif url.startswith("sqlite"):
            engine = {"connect_args": {"timeout": 120}}  # workers of one machine wait for each other's writes
            db = _sqlite_path(url)
            if db and db != ":memory:":
                _ours_or_new(Path(db), _is_optuna_db, "an Optuna SQLite database")
                Path(db).parent.mkdir(parents=True, exist_ok=True)
        with experimental_features():
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        return storage
    except InputError:
        raise
    except Exception as exc:  # drivers raise their own types: unreachable host, bad credentials, no such driver
        text = " ".join(str(exc).split())
        raise InputError(f"cannot reach the study storage {redacted(url)}: {type(exc).__name__}: {text[:300]}") from None


def _sqlite_path(url: str) -> str:
    """The database file of an sqlite URL; a URL with a user, a password or a host is refused (it is not a file,
    and its parts must never become folder names)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise InputError(f"storage {redacted(url)}: not a valid SQLAlchemy URL; SQLite is sqlite:///PATH") from None
    if parsed.username or parsed.password or parsed.host or parsed.port:
        raise InputError(f"storage {redacted(url)}: an SQLite URL names a file only (sqlite:///PATH): no user, "
                         "password or host")
    return str(parsed.database or "")


def _ours_or_new(path: Path, is_ours: Any, what: str) -> None:
    """A storage file is created by the search or is one it created before: never a file of someone else's,
    which Optuna would append to or add tables to. Refused before anything is written."""
    if path.is_symlink():
        raise InputError(f"storage {path}: is a symbolic link; give the path of the file itself")
    if not path.exists():
        return
    if not path.is_file():
        raise InputError(f"storage {path}: is not a regular file")
    if path.stat().st_size and not is_ours(path):
        raise InputError(f"storage {path}: exists and is not {what}; compresspipe never writes into a file it did "
                         "not create: give a new path (or the storage of an earlier search)")


def _is_journal(path: Path) -> bool:
    """Whether the file starts as an Optuna journal: JSON lines with an `op_code`."""
    with path.open("rb") as fh:
        first = fh.readline(1 << 20)
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _is_optuna_db(path: Path) -> bool:
    """Whether the file is an SQLite database holding Optuna's tables (read only)."""
    import sqlite3

    with path.open("rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            return False
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return not tables or {"studies", "trials"} <= tables


def identity(raw: dict[str, Any]) -> str:
    """sha256 of what makes two invocations the same search: the recipe and its search block, minus the settings
    that may change between them (n_trials, timeout, pick, storage)."""
    data = json.loads(json.dumps(raw, default=str))
    search = data.get("search") or {}
    for key in MUTABLE:
        search.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def directions(spec: SearchSpec) -> list[Literal["minimize", "maximize"]]:
    return list(spec.objectives.values())


def make_sampler(spec: SearchSpec, seed: int, worker: int) -> optuna.samplers.BaseSampler:
    """The search's sampler; each worker draws from its own seed, so parallel workers do not repeat each other.
    TPE and NSGA-II read the gates from each trial's constraints (`Trial.set_constraint`)."""
    import optuna

    seed = seed + 1000 * worker
    n = spec.trials()
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(2, min(10, n // 4)))
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n // 4)))
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({k: d.grid() or [] for k, d in spec.space.items()}, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def create_study(storage: optuna.storages.BaseStorage, name: str, spec: SearchSpec, raw: dict[str, Any],
                 sampler: optuna.samplers.BaseSampler, force: bool = False) -> optuna.Study:
    """Create the study, or load it when this search made it; refuse a study made by a different search."""
    import optuna

    if force and name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a worker prints one line of its own per trial
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=directions(spec),
                                load_if_exists=True)
    mine = identity(raw)
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        study.set_user_attr(STUDY_ATTR, {"identity": mine, "raw": raw, "objectives": list(spec.objectives),
                                         "created_on": socket.gethostname()})
    elif stored.get("identity") != mine:
        raise InputError(f"study {name!r} in this storage was made by a different search (its recipe or search "
                         "block differs); name another study with --set search.study=NAME, use another --out, or "
                         "start over with --force")
    if [d.name.lower() for d in study.directions] != directions(spec):
        raise InputError(f"study {name!r} has directions {[d.name.lower() for d in study.directions]}, the search "
                         f"asks for {directions(spec)}; start over with --force")
    return study


def load_joined(url: str, name: str | None) -> tuple[optuna.storages.BaseStorage, str, dict[str, Any]]:
    """(storage, study name, the search recipe stored with it) for a worker joining by URL."""
    import optuna

    storage = open_storage(url)
    names = optuna.get_all_study_names(storage)
    if name is None:
        if len(names) != 1:
            raise InputError(f"{redacted(url)} holds {len(names)} studies ({', '.join(names) or 'none'}); name one "
                             "with --study")
        name = names[0]
    if name not in names:
        from compresspipe.registry import unknown_message

        raise InputError(unknown_message("study", name, names) + f" in {redacted(url)}")
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.user_attrs.get(STUDY_ATTR)
    if not isinstance(stored, dict) or not isinstance(stored.get("raw"), dict):
        raise InputError(f"study {name!r} in {redacted(url)} was not made by compresspipe search")
    return storage, name, stored["raw"]
