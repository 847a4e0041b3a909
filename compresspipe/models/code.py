"""`python: path/to/file.py:factory`: the user's own nn.Module, built by a function in a local file.

This runs code, and recipes and run folders travel between teams, so it needs an explicit opt-in: `--allow-code`
on the command line (the recipe layer's validation context), or `allowing_code()` / `load_model(...,
allow_code=True)` in Python. The artifact records the file's sha256, and a rebuild from a file whose bytes
changed is refused. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Any

FLAG = "--allow-code"
MAX_SOURCE_BYTES = 16 * 2**20  # a model definition is a few KB; a file this big is not one
_ALLOWED: ContextVar[bool] = ContextVar("compresspipe_allow_code", default=False)
_MODULES: dict[tuple[str, str], ModuleType] = {}  # (path, sha256) -> the module, so classes stay one object
_REF = re.compile(r"^(?P<path>.+\.py):(?P<factory>[A-Za-z_][A-Za-z0-9_]*)$")


def code_allowed() -> bool:
    """Whether this thread may build `python:` models (set by `--allow-code` or `allowing_code()`)."""
    return _ALLOWED.get()


@contextlib.contextmanager
def allowing_code(allowed: bool = True) -> Iterator[None]:
    """Within the block, `python:` model sources may be built (a run started with --allow-code)."""
    token = _ALLOWED.set(allowed or _ALLOWED.get())
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def refusal(path: str) -> str:
    return (f"this model is built by running the code in {path}, and compresspipe runs no code from a recipe or a "
            f"run folder unless asked: pass {FLAG} to run, plan or validate (in Python: "
            "load_model(folder, allow_code=True))")


def split_ref(ref: str) -> tuple[str, str]:
    """'path/to/file.py:factory' -> (path, factory); ValueError naming the expected form."""
    found = _REF.match(ref.strip())
    if found is None:
        raise ValueError(f"python: expects 'path/to/file.py:factory' (a .py file and the name of a function or "
                         f"class in it that returns the nn.Module); got {ref!r}")
    return found.group("path"), found.group("factory")


def file_sha256(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a model definition (limit {MAX_SOURCE_BYTES})")
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _CheckedSource(importlib.abc.SourceLoader):
    """Imports a file from the bytes whose sha256 was just checked (read once: the file cannot change in between),
    through the import system like any module; writes no bytecode cache next to the user's file."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data

    def get_filename(self, fullname: str) -> str:
        return str(self.path)

    def get_data(self, path: str) -> bytes:
        if path != str(self.path):  # a bytecode cache it might look for: there is none
            raise OSError(path)
        return self.data


class _NoSiblings(importlib.abc.MetaPathFinder):
    """Refuses, while the user's file runs, an import of a module that lives beside it: only the model file's sha256
    is recorded and checked, so a helper module next to it could change the model without notice."""

    def __init__(self, path: Path):
        self.path, self.folder = path, path.resolve().parent

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if path is not None:  # a submodule of a package already imported: its parent was checked
            return None
        top = fullname.split(".")[0]
        for candidate in (self.folder / f"{top}.py", self.folder / top / "__init__.py"):
            if candidate.is_file() and candidate.resolve() != self.path.resolve():
                raise ImportError(f"{self.path} imports {top!r} from its own folder ({candidate}); compresspipe "
                                  f"records and checks the sha256 of {self.path.name} only, so a module beside it "
                                  f"could change the model unnoticed: put that code in {self.path.name}, or install "
                                  "it as a package")
        return None


@contextlib.contextmanager
def _siblings_refused(path: Path) -> Iterator[None]:
    finder = _NoSiblings(path)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def load_factory(path: Path, factory: str, sha256: str | None) -> Callable[..., Any]:
    """Import the file (once per content hash) and return its factory; the hash must match when given."""
    if not code_allowed():
        raise PermissionError(refusal(str(path)))
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is not None and actual != sha256:
        raise ValueError(f"{path} changed since the model was made (sha256 {sha256[:12]}..., the file now "
                         f"{actual[:12]}...); refusing to rebuild it from different code. Restore the file, or "
                         "run the recipe again to make a new model")
    key = (str(path.resolve()), actual)
    module = _MODULES.get(key)
    if module is None:
        name = f"compresspipe_user_model_{actual[:16]}"
        loader = _CheckedSource(path, data)
        spec = importlib.util.spec_from_loader(name, loader, origin=str(path))
        if spec is None:  # pragma: no cover - spec_from_loader returns a spec for any name
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and typing look their module up by name
        try:
            with _siblings_refused(path):
                loader.exec_module(module)  # the import system runs the file: the user opted in (--allow-code)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _MODULES[key] = module
    fn = getattr(module, factory, None)
    if not callable(fn):
        known = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AttributeError(f"{path} has no function or class {factory!r}; callables there: "
                             f"{', '.join(known) or '(none)'}")

    def build(*args: Any, **kwargs: Any) -> Any:  # an import inside the factory is held to the same rule
        with _siblings_refused(path):
            return fn(*args, **kwargs)

    return build
