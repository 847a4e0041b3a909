"""One registry per kind of thing (stages, models, datasets), filled the same way for builtins and plugins.

Builtins register a lazy ``"module:attr"`` reference so that listing names never imports torch.
Third-party packages announce themselves through an entry-point group
(``compresspipe.stages``, ``compresspipe.models``, ``compresspipe.datasets``); the entry-point name is the
registered name. A name registered twice is an error, and a plugin that fails to import is reported
with its name and the import error when it is used.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from compresspipe.errors import RegistryError

T = TypeVar("T")

PLUGINS_ENV = "COMPRESSPIPE_NO_PLUGINS"


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest valid name for a misspelt one, or None."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_message(kind: str, name: object, choices: list[str] | tuple[str, ...]) -> str:
    """`unknown stage 'prun'; did you mean 'prune'? known: a, b, c` (timm's style)."""
    msg = f"unknown {kind} {name!r}"
    hint = closest(str(name), choices)
    if hint:
        msg += f"; did you mean {hint!r}?"
    return msg + f" known: {', '.join(sorted(choices)) or '(none)'}"


def import_ref(ref: str) -> Any:
    """Import ``package.module:attr``."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


@dataclass
class Entry:
    name: str
    target: Any  # the object, or a "module:attr" string not imported yet
    source: str  # "builtin" or "plugin <dist> (<module:attr>)"
    error: str | None = None

    def load(self, kind: str) -> Any:
        if self.error is None and isinstance(self.target, str):
            try:
                self.target = import_ref(self.target)
            except Exception as exc:  # a plugin's import error is reported, not raised raw
                self.error = f"{type(exc).__name__}: {exc}"
        if self.error is not None:
            raise RegistryError(f"{kind} {self.name!r} from {self.source} failed to import: {self.error}")
        return self.target


@dataclass
class Registry(Generic[T]):
    """Names to objects of one kind; plugins load from ``group`` on first use."""

    kind: str
    group: str
    _entries: dict[str, Entry] = field(default_factory=dict)
    _plugins_loaded: bool = False

    def register(self, name: str, target: Any, source: str = "builtin") -> None:
        if name in self._entries:
            other = self._entries[name]
            raise RegistryError(
                f"{self.kind} name collision: {name!r} is registered by {other.source} and again by {source}; "
                f"uninstall one of them or rename the {self.kind}"
            )
        self._entries[name] = Entry(name, target, source)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if os.environ.get(PLUGINS_ENV):
            return
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
            self.register(ep.name, ep.value, source=f"plugin package {dist!r} ({ep.value})")

    def entries(self) -> Iterator[Entry]:
        self._load_plugins()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def get(self, name: str) -> T:
        self._load_plugins()
        entry = self._entries.get(name)
        if entry is None:
            raise RegistryError(unknown_message(self.kind, name, self.names()))
        return entry.load(self.kind)  # type: ignore[no-any-return]

    def try_get(self, name: str) -> tuple[T | None, str | None]:
        """The object, or None and the reason (unknown name, failed import)."""
        try:
            return self.get(name), None
        except RegistryError as exc:
            return None, str(exc)
