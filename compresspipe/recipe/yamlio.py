"""Safe YAML reading that remembers where every value came from.

The YAML 1.1 traps are closed here: scalars resolve by the YAML 1.2 core schema (``1e-3`` is a float,
``no``/``on`` stay strings, ``010`` is the integer 10), duplicate keys are errors, tags that would
construct objects are errors, merge keys are errors, and alias expansion is bounded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, cast

import yaml

from compresspipe.errors import Problem, RecipeError

Pos = tuple[int, int]
Loc = tuple[str | int, ...]

MAX_NODES = 200_000
MAX_TEXT_BYTES = 4 * 2**20  # a recipe (or a base it extends, or a lock file) is a few KB; refuse a huge file
MAX_EXPANDED_BYTES = 16 * 2**20  # scalar text after alias expansion: a 1 MB string used 50,000 times is refused

_STD = "tag:yaml.org,2002:"
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_TRUE = re.compile(r"^(?:true|True|TRUE)$")
_BOOL_FALSE = re.compile(r"^(?:false|False|FALSE)$")
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")


def resolve_plain_scalar(text: str) -> Any:
    """Value of an untagged plain scalar under the YAML 1.2 core schema."""
    if _NULL.match(text):
        return None
    if _BOOL_TRUE.match(text):
        return True
    if _BOOL_FALSE.match(text):
        return False
    if _INT10.match(text):
        return int(text)
    if _INT8.match(text):
        return int(text[2:], 8)
    if _INT16.match(text):
        return int(text[2:], 16)
    if _FLOAT.match(text):
        return float(text)
    if _INF.match(text):
        return -math.inf if text.startswith("-") else math.inf
    if _NAN.match(text):
        return math.nan
    return text


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader whose implicit resolvers are switched off: we resolve scalars ourselves."""


_ComposeLoader.yaml_implicit_resolvers = {}
_PLAIN = "?plain"


def _resolve(self: yaml.SafeLoader, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
    if kind is yaml.ScalarNode and implicit and implicit[0]:
        return _PLAIN
    return yaml.resolver.BaseResolver.resolve(self, kind, value, implicit)  # type: ignore[arg-type]


_ComposeLoader.resolve = _resolve  # type: ignore[method-assign,assignment]


class _Builder:
    def __init__(self, filename: str):
        self.filename = filename
        self.positions: dict[Loc, Pos] = {}
        self.key_positions: dict[Loc, Pos] = {}
        self.problems: list[Problem] = []
        self.count = 0
        self.size = 0

    def problem(self, node: yaml.Node, loc: Loc, message: str) -> None:
        mark = node.start_mark
        self.problems.append(Problem(self.filename, mark.line + 1, mark.column + 1, format_loc(loc), message))

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise RecipeError(
                [Problem(self.filename, None, None, "", f"document expands to more than {MAX_NODES} values "
                                                        "(alias bomb?); refusing to read it")]
            )
        self.positions[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            if node.tag != _STD + "map":
                self.problem(node, loc, f"YAML tag {node.tag!r} is not allowed (only plain mappings)")
                return None
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _STD + "merge" or (key_node.tag == _PLAIN and key_node.value == "<<"):
                    self.problem(key_node, loc, "YAML merge keys ('<<') are not supported; write the keys out")
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problem(key_node, loc, "mapping keys must be plain strings")
                    continue
                key = self.build_scalar(key_node, loc)
                if not isinstance(key, str | int) or isinstance(key, bool):
                    key = key_node.value
                key = str(key)
                sub = (*loc, key)
                if key in out:
                    first = self.key_positions.get(sub)
                    where = f" (first defined on line {first[0]})" if first else ""
                    self.problem(key_node, sub, f"duplicate key {key!r}{where}")
                    continue
                self.key_positions[sub] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                out[key] = self.build(value_node, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _STD + "seq":
                self.problem(node, loc, f"YAML tag {node.tag!r} is not allowed (only plain lists)")
                return None
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        return self.build_scalar(cast(yaml.ScalarNode, node), loc)

    def build_scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        self.size += len(node.value)
        if self.size > MAX_EXPANDED_BYTES:
            raise RecipeError(
                [Problem(self.filename, None, None, "", f"document expands to more than {MAX_EXPANDED_BYTES} bytes "
                                                        "of text (alias bomb?); refusing to read it")]
            )
        tag = node.tag
        if tag == _PLAIN:  # plain, untagged
            return resolve_plain_scalar(node.value)
        if tag in ("!", _STD + "str"):  # quoted, or explicitly !!str
            return node.value
        if tag in (_STD + "int", _STD + "float", _STD + "bool", _STD + "null"):
            value = resolve_plain_scalar(node.value)
            want: Any = {"int": int, "float": (int, float), "bool": bool, "null": type(None)}[tag[len(_STD):]]
            if not isinstance(value, want):
                self.problem(node, loc, f"{node.value!r} is not a valid {tag[len(_STD):]}")
                return node.value
            return float(value) if tag.endswith("float") else value
        self.problem(node, loc, f"YAML tag {tag!r} is not allowed: recipes are plain data and never construct objects")
        return None


def format_loc(loc: Loc) -> str:
    """('stages', 0, 'amount') -> 'stages[0].amount'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class YamlDocument:
    """A parsed YAML document: its data and where each value (and each key) sits."""

    def __init__(self, data: Any, filename: str, positions: dict[Loc, Pos], key_positions: dict[Loc, Pos],
                 origins: dict[Loc, str] | None = None):
        self.data = data
        self.filename = filename
        self.positions = positions
        self.key_positions = key_positions
        # file each value came from, when a document is merged from several (extends)
        self.origins = origins or {}

    def file_of(self, loc: Loc) -> str:
        loc = tuple(loc)
        while loc:
            if loc in self.origins:
                return self.origins[loc]
            loc = loc[:-1]
        return self.origins.get((), self.filename)

    def where(self, loc: Loc, key: bool = False) -> Pos | None:
        """Line and column of the value at loc, else of its key, else of the nearest parent."""
        loc = tuple(loc)
        if key and loc in self.key_positions:
            return self.key_positions[loc]
        while True:
            if loc in self.positions:
                return self.positions[loc]
            if loc in self.key_positions:
                return self.key_positions[loc]
            if not loc:
                return None
            loc = loc[:-1]


def parse_yaml_text(text: str, filename: str) -> YamlDocument:
    """Parse one YAML document safely; raise RecipeError with every problem found."""
    try:
        loader = _ComposeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise RecipeError([Problem(filename, line, col, "", f"not valid YAML: {what}")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(filename, None, None, "", f"not valid YAML: {exc}")]) from None
    if node is None:
        return YamlDocument({}, filename, {}, {})
    builder = _Builder(filename)
    data = builder.build(node, ())
    if builder.problems:
        raise RecipeError(builder.problems)
    return YamlDocument(data, filename, builder.positions, builder.key_positions)


def read_text_file(path: Path, what: str = "recipe") -> str:
    """Read a UTF-8 text file, with a clear error for missing, binary or non-UTF-8 files."""
    name = str(path)
    if not path.exists():
        raise RecipeError([Problem(name, None, None, "", f"{what} file not found")])
    if path.is_dir():
        raise RecipeError([Problem(name, None, None, "", f"{what} path is a folder, not a file")])
    if not path.is_file():
        raise RecipeError([Problem(name, None, None, "", f"{what} path is not a regular file (a device or a pipe?)")])
    with path.open("rb") as fh:
        raw = fh.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise RecipeError([Problem(name, None, None, "", f"{what} file is larger than {MAX_TEXT_BYTES} bytes; a "
                                                         f"{what} is a few KB of YAML")])
    if b"\x00" in raw[:8192]:
        raise RecipeError([Problem(name, None, None, "", f"{what} file is binary, not UTF-8 text")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            [Problem(name, line, None, "", f"{what} file is not UTF-8 text (bad byte at offset {exc.start})")]
        ) from None
    return text


def dump_yaml(data: Any) -> str:
    """Plain, stable YAML for files we write (lock files, starter recipes)."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
