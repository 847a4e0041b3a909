"""Composition: `extends: base.yaml` (deep merge, stages matched by name) and `vars:` substitution.

Order, documented in the README: the base chain is merged first (the extending file wins), then
`--set` overrides, then `${vars.name}` placeholders are replaced. Substitution is plain text
replacement, never evaluation. Errors keep the file and line of the value that caused them.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from compresspipe.errors import Problem, RecipeError
from compresspipe.recipe.yamlio import (
    MAX_EXPANDED_BYTES,
    Loc,
    YamlDocument,
    format_loc,
    parse_yaml_text,
    read_text_file,
)
from compresspipe.registry import closest

# Keys whose relative paths are resolved against the file that wrote them, so a shared base recipe
# can name its own checkpoint or data folder.
PATH_KEYS = ("checkpoint", "path")
_VAR = re.compile(r"\$\{vars\.([A-Za-z_][A-Za-z0-9_-]*)\}")
_ANY_VAR = re.compile(r"\$\{([^}]*)\}")


def raw_stage_names(stages: list[Any]) -> list[str | None]:
    """The names the loader will give stages (explicit name, else type, type-2, ...)."""
    names: list[str | None] = []
    taken = {s.get("name") for s in stages if isinstance(s, dict) and s.get("name")}
    for s in stages:
        if not isinstance(s, dict):
            names.append(None)
        elif s.get("name"):
            names.append(str(s["name"]))
        else:
            base, n, name = str(s.get("type")), 2, str(s.get("type"))
            while name in taken or name == "baseline":
                name, n = f"{base}-{n}", n + 1
            taken.add(name)
            names.append(name)
    return names


class _Merged:
    def __init__(self, doc: YamlDocument):
        self.data = copy.deepcopy(doc.data)
        self.positions = dict(doc.positions)
        self.keys = dict(doc.key_positions)
        self.origins: dict[Loc, str] = {(): doc.filename}
        self.origins.update(doc.origins)

    def _drop(self, loc: Loc) -> None:
        n = len(loc)
        for table in (self.positions, self.keys, self.origins):
            for k in [k for k in table if k[:n] == loc and k != ()]:
                del table[k]

    def _take(self, child: YamlDocument, src: Loc, dst: Loc) -> None:
        n = len(src)
        for table, other in ((self.positions, child.positions), (self.keys, child.key_positions)):
            for k, v in other.items():
                if k[:n] == src:
                    table[dst + k[n:]] = v
        self.origins[dst] = child.file_of(src) if src else child.filename

    def merge(self, child: YamlDocument) -> None:
        self.data = self._merge(self.data, child.data, child, (), ())

    def _merge(self, base: Any, over: Any, child: YamlDocument, src: Loc, dst: Loc) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                if dst == () and key == "stages" and isinstance(base.get(key), list) and isinstance(value, list):
                    out[key] = self._merge_stages(base[key], value, child)
                elif key in base:
                    out[key] = self._merge(base[key], value, child, (*src, key), (*dst, key))
                else:
                    self._take(child, (*src, key), (*dst, key))
                    out[key] = copy.deepcopy(value)
            return out
        self._drop(dst)
        self._take(child, src, dst)
        return copy.deepcopy(over)

    def _merge_stages(self, base: list[Any], over: list[Any], child: YamlDocument) -> list[Any]:
        out = list(base)
        base_names = raw_stage_names(base)
        for i, (stage, name) in enumerate(zip(over, raw_stage_names(over), strict=True)):
            src = ("stages", i)
            if name is not None and name in base_names:
                j = base_names.index(name)
                out[j] = self._merge(base[j], stage, child, src, ("stages", j))
            else:
                j = len(out)
                self._take(child, src, ("stages", j))
                out.append(copy.deepcopy(stage))
                base_names.append(name)
        return out

    def document(self, filename: str) -> YamlDocument:
        return YamlDocument(self.data, filename, self.positions, self.keys, self.origins)


def _absolutise_paths(doc: YamlDocument, folder: Path) -> None:
    """Rewrite relative `checkpoint:`/`path:` values of a base file against its own folder."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in PATH_KEYS and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                    node[key] = str(folder / value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc.data)


def load_composed(path: Path, chain: tuple[Path, ...] = ()) -> YamlDocument:
    """Parse a recipe file and, recursively, the files it extends; merge them."""
    doc = parse_yaml_text(read_text_file(path), str(path))
    real = path.resolve()
    if not isinstance(doc.data, dict) or "extends" not in doc.data:
        return doc
    parent = doc.data.pop("extends")
    where = doc.where(("extends",)) or (None, None)
    if not isinstance(parent, str) or not parent:
        raise RecipeError([Problem(str(path), where[0], where[1], "extends", "must be the path of a recipe file")])
    base_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    names = " -> ".join(str(p) for p in (*chain, real))
    if base_path.resolve() in (*chain, real):
        raise RecipeError([Problem(str(path), where[0], where[1], "extends",
                                   f"extends cycle: {names} -> {base_path.resolve()}")])
    if not base_path.is_file():
        raise RecipeError([Problem(str(path), where[0], where[1], "extends",
                                   f"base recipe not found: {base_path} (extends chain: {names})")])
    base = load_composed(base_path, (*chain, real))
    if not isinstance(base.data, dict):
        raise RecipeError([Problem(str(path), where[0], where[1], "extends", f"base {base_path} is not a recipe "
                                   f"(its top level is a {type(base.data).__name__}, not a mapping of keys)")])
    _absolutise_paths(base, base_path.resolve().parent)
    merged = _Merged(base)
    merged.merge(doc)
    return merged.document(str(path))


def substitute_vars(data: Any, doc: YamlDocument, set_vars: dict[str, str] | None = None) -> Any:
    """Replace `${vars.name}` placeholders; `vars` itself is removed from the result.

    `set_vars`: variables set on the command line (name -> the --set text); one that no value uses is an
    error, since setting it would silently change nothing.
    """
    if not isinstance(data, dict):
        return data
    variables = data.pop("vars", None) or {}
    problems: list[Problem] = []

    def report(loc: Loc, message: str) -> None:
        pos = doc.where(loc) or (None, None)
        problems.append(Problem(doc.file_of(loc), pos[0], pos[1], format_loc(loc), message))

    if not isinstance(variables, dict):
        report(("vars",), "must be a mapping of names to values")
        variables = {}
    for name, value in variables.items():
        if isinstance(value, str) and _ANY_VAR.search(value):
            report(("vars", name), "a variable cannot refer to other variables")

    used: set[str] = set()
    budget = [MAX_EXPANDED_BYTES]  # bytes of substituted text left: `${vars.x}` used 3,000 times is bounded

    def spend(value: Any, loc: Loc) -> Any:
        budget[0] -= len(json.dumps(value, default=str)) if not isinstance(value, str) else len(value)
        if budget[0] < 0:
            raise RecipeError([Problem(doc.file_of(loc), None, None, format_loc(loc), "substituting the variables "
                              f"makes the recipe larger than {MAX_EXPANDED_BYTES} bytes; use fewer or shorter values")])
        return value

    def sub(node: Any, loc: Loc) -> Any:
        if isinstance(node, dict):
            return {k: sub(v, (*loc, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v, (*loc, i)) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        for m in _ANY_VAR.finditer(node):
            inner = m.group(1)
            if not inner.startswith("vars."):
                report(loc, f"unknown placeholder ${{{inner}}}; only ${{vars.NAME}} is substituted")
                return node
            if inner[5:] not in variables:
                known = ", ".join(sorted(variables)) or "(none)"
                report(loc, f"undefined variable {inner[5:]!r}; defined in vars: {known}")
                return node
            used.add(inner[5:])
        whole = _VAR.fullmatch(node)
        if whole:
            return copy.deepcopy(spend(variables[whole.group(1)], loc))
        return _VAR.sub(lambda m: str(spend(str(variables[m.group(1)]), loc)), node)

    out = sub(data, ())
    for name, raw in (set_vars or {}).items():
        if name not in used:
            hint = closest(name, sorted(used))
            problems.append(Problem(f"--set {raw}", None, None, f"vars.{name}",
                                    f"no value uses ${{vars.{name}}}, so setting it changes nothing"
                                    + (f"; did you mean {hint!r}?" if hint else "")
                                    + f" used variables: {', '.join(sorted(used)) or '(none)'}"))
    if problems:
        raise RecipeError(problems)
    return out
