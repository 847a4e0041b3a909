"""`python: path/to/file.py:factory`: the user's own nn.Module, built by a function in a local file.

This runs code, and recipes and run folders travel between teams, so it needs an explicit opt-in: `--allow-code`
on the command line (the recipe layer's validation context), or `allowing_code()` / `load_model(...,
allow_code=True)` in Python. The artifact records the file's sha256 and the sha256 of every module the file (or its
factory) imports from its own folder and the packages below it, and a rebuild from code whose bytes changed is
refused. Every one of those modules is imported from the bytes that were hashed. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

FLAG = "--allow-code"
MAX_SOURCE_BYTES = 16 * 2**20  # a model definition is a few KB; a file this big is not one
MAX_MODULES = 256  # local modules one model file may import
_ALLOWED: ContextVar[bool] = ContextVar("compresspipe_allow_code", default=False)
_REF = re.compile(r"^(?P<path>.+\.py):(?P<factory>[A-Za-z_][A-Za-z0-9_]*)$")
MODULE_KEY = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.?(?:/|$))[^\\:\x00]+\.py$")  # a relative posix path to a .py file


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


def _read_source(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a model definition (limit {MAX_SOURCE_BYTES})")
    return path.read_bytes()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(_read_source(path)).hexdigest()


def code_changes(path: Path, sha256: str | None, modules: Mapping[str, str] | None) -> list[str]:
    """What differs between a model file (and the local modules recorded with it) and the sha256s recorded: one line
    per file that changed or is missing; empty when all are as recorded. Reads the files, runs nothing."""
    problems = []
    files = [(path, sha256)] if sha256 is not None else []
    files += [(path.parent / rel, want) for rel, want in sorted((modules or {}).items())]
    for file, want in files:
        if not file.is_file():
            problems.append(f"{file} is missing (the model was made from sha256 {want[:12]}...)")
            continue
        try:
            actual = file_sha256(file)
        except (OSError, ValueError) as exc:
            problems.append(f"{file}: cannot read it ({exc})")
            continue
        if actual != want:
            problems.append(f"{file} changed since the model was made (sha256 {want[:12]}... then, {actual[:12]}... "
                            "now)")
    return problems


class _CheckedSource(importlib.abc.SourceLoader):
    """Imports a file from the bytes whose sha256 was just checked (read once: the file cannot change in between),
    through the import system like any module; writes no bytecode cache next to the user's file."""

    def __init__(self, path: Path, data: bytes, package: bool = False):
        self.path, self.data, self.package = path, data, package

    def get_filename(self, fullname: str) -> str:
        return str(self.path)

    def get_data(self, path: str) -> bytes:
        if path != str(self.path):  # a bytecode cache it might look for: there is none
            raise OSError(path)
        return self.data

    def is_package(self, fullname: str) -> bool:
        return self.package


class CodeChanged(ValueError):
    """A local module's bytes are not the ones the model was made from."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


@dataclass(eq=False)
class _LocalModules(importlib.abc.MetaPathFinder):
    """While the user's file runs (its import, then each factory call), a module it imports from its own folder or a
    package below it is read here, hashed, recorded (`found`), checked against `expected` when the model was made
    before, and imported from those very bytes. Code there that cannot be hashed as a .py file (a compiled module,
    a bytecode file) is refused."""

    main: Path
    expected: Mapping[str, str] | None = None
    found: dict[str, str] = field(default_factory=dict)
    modules: dict[str, ModuleType] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # kept: the user's code might catch the error we raise

    @property
    def folder(self) -> Path:
        return self.main.parent

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        leaf = fullname.rpartition(".")[2]
        if path is None:
            places = [self.folder]
        else:
            places = [Path(p).resolve() for p in path if _inside(Path(p), self.folder)]
        for place in places:
            for candidate, package in ((place / leaf / "__init__.py", True), (place / f"{leaf}.py", False)):
                if candidate.is_file():
                    return self._spec(fullname, candidate, package)
        if not places:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        origin = Path(spec.origin) if spec.origin else None
        if spec.origin is None or not spec.has_location:  # a namespace package: no code; its modules come here
            return spec if spec.submodule_search_locations and all(
                _inside(Path(p), self.folder) for p in spec.submodule_search_locations) else None
        if origin is not None and _inside(origin, self.folder):
            raise ImportError(f"{self.main} imports {fullname!r} from {origin}, which is not Python source: "
                              "compresspipe records and checks the sha256 of every module a model file imports from "
                              "its folder, and can do that for .py files only; install that module as a package")
        return None

    def _spec(self, fullname: str, candidate: Path, package: bool) -> importlib.machinery.ModuleSpec:
        rel = candidate.relative_to(self.folder).as_posix()
        data = _read_source(candidate)
        actual = hashlib.sha256(data).hexdigest()
        if self.expected is not None and self.expected.get(rel) != actual:
            want = self.expected.get(rel)
            what = (f"{self.main.name} now imports {candidate}, which the model was not made with" if want is None
                    else f"{candidate} changed since the model was made (sha256 {want[:12]}... then, {actual[:12]}... "
                         "now)")
            self.refused.append(f"{what}; refusing to rebuild it from different code. Restore the code, or run the "
                                "recipe again to make a new model")
            raise CodeChanged(self.refused[-1])
        if len(self.found) >= MAX_MODULES and rel not in self.found:
            raise ImportError(f"{self.main} imports more than {MAX_MODULES} modules from its folder")
        self.found[rel] = actual
        spec = importlib.util.spec_from_loader(fullname, _CheckedSource(candidate, data, package),
                                               origin=str(candidate), is_package=package)
        if spec is None:  # pragma: no cover - spec_from_loader returns a spec for any name
            raise ImportError(f"cannot import {candidate}")
        if package:
            spec.submodule_search_locations = [str(candidate.parent)]
        spec.has_location = True
        return spec

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The window in which the user's code runs: this model's own local modules stand under their names in
        sys.modules (not another model's, nor an older version's), and a new import from the folder comes here."""
        for name, module in list(sys.modules.items()):
            if isinstance(getattr(getattr(module, "__spec__", None), "loader", None), _CheckedSource) \
                    and not name.startswith(_PREFIX):
                del sys.modules[name]
        sys.modules.update(self.modules)
        sys.meta_path.insert(0, self)
        try:
            yield
            if self.refused:  # the user's code caught the refusal: it still stands (for good: see load_factory)
                raise CodeChanged(self.refused[0])
        finally:
            sys.meta_path.remove(self)
            for name, module in list(sys.modules.items()):
                if isinstance(getattr(getattr(module, "__spec__", None), "loader", None), _CheckedSource) \
                        and not name.startswith(_PREFIX) and _inside(Path(module.__spec__.origin or "/"),  # type: ignore[union-attr]
                                                                     self.folder):
                    self.modules[name] = module

    def unchanged(self) -> bool:
        """Whether every module imported so far still has the bytes it was imported from."""
        return not code_changes(self.main, None, self.found)


_PREFIX = "compresspipe_user_model_"
_MODULES: dict[tuple[str, str], tuple[ModuleType, _LocalModules]] = {}  # (path, sha256) -> the module and its imports


class CodeFactory:
    """The factory of a user's model file: calling it builds the model with the file's local modules checked, and
    `modules` then lists every one imported ({path relative to the file's folder: sha256})."""

    def __init__(self, fn: Any, local: _LocalModules):
        self.fn, self.local = fn, local

    @property
    def modules(self) -> dict[str, str]:
        return dict(sorted(self.local.found.items()))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # an import inside the factory is held to the same rule
        with self.local.active():
            return self.fn(*args, **kwargs)


def load_factory(path: Path, factory: str, sha256: str | None,
                 modules: Mapping[str, str] | None = None) -> CodeFactory:
    """Import the file (once per content hash) and return its factory. `sha256` and `modules` are what the model was
    made from, when it was: the file and every recorded local module must still match them, and a local module
    outside `modules` may not be imported."""
    if not code_allowed():
        raise PermissionError(refusal(str(path)))
    data = _read_source(path)
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is not None and actual != sha256:
        raise CodeChanged(f"{path} changed since the model was made (sha256 {sha256[:12]}..., the file now "
                          f"{actual[:12]}...); refusing to rebuild it from different code. Restore the file, or "
                          "run the recipe again to make a new model")
    changed = code_changes(path, None, modules)
    if changed:
        raise CodeChanged(f"{'; '.join(changed)}: the model file {path.name} imports it; refusing to rebuild the "
                          "model from different code. Restore the file, or run the recipe again to make a new model")
    key = (str(path.resolve()), actual)
    cached = _MODULES.get(key)
    if cached is not None and not cached[1].refused and cached[1].unchanged() and (
            modules is None or set(cached[1].found) <= set(modules)):
        module, local = cached
    else:
        local = _LocalModules(path.resolve())
        name = f"{_PREFIX}{actual[:16]}"
        loader = _CheckedSource(path, data)
        spec = importlib.util.spec_from_loader(name, loader, origin=str(path))
        if spec is None:  # pragma: no cover - spec_from_loader returns a spec for any name
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and typing look their module up by name
        local.expected = modules
        try:
            with local.active():
                loader.exec_module(module)  # the import system runs the file: the user opted in (--allow-code)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _MODULES[key] = (module, local)
    local.expected = modules
    fn = getattr(module, factory, None)
    if not callable(fn):
        known = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AttributeError(f"{path} has no function or class {factory!r}; callables there: "
                             f"{', '.join(known) or '(none)'}")
    return CodeFactory(fn, local)
