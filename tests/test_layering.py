"""The package's layering, enforced: packages are ordered from the bottom (errors) to the top (cli); no module imports
a package above its own at module level, and no module-level import cycle exists. Imports inside functions that
still reach up are listed in UPWARD_DEBT, which may only shrink: a new one fails here, and so does an entry that
no longer exists (delete it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compresspipe"
# bottom to top; a package may import the ones before it
LAYERS = ["errors", "cache", "registry", "ui", "recipe", "data", "models", "artifacts", "metrics", "training", "runtimes", "deploy",
          "sensitivity", "stages", "report", "run", "search", "cli"]
# (module, package above it) that a function imports today: known debt, to be removed
UPWARD_DEBT = frozenset({
    # the recipe resolves the config classes the registries name (lazily, to stay torch-free)
    ("compresspipe/recipe/loader.py", "data"), ("compresspipe/recipe/loader.py", "metrics"),
    ("compresspipe/recipe/loader.py", "stages"), ("compresspipe/recipe/schema.py", "data"),
    ("compresspipe/recipe/schema.py", "stages"), ("compresspipe/recipe/spec.py", "models"),
    # the sensitivity command runs the executor and writes a report: it belongs beside cli
    ("compresspipe/sensitivity/command.py", "report"), ("compresspipe/sensitivity/command.py", "run"),
    ("compresspipe/sensitivity/command.py", "stages"),
})


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported compresspipe module, at module level?) for every import in the file; `if TYPE_CHECKING:` blocks are
    not imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)}
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    checking = {id(n) for b in tree.body if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                for n in ast.walk(b)}
    out = []
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out += [(n, id(node) in top) for n in names if n == "compresspipe" or n.startswith("compresspipe.")]
    return out


def _files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _upward(path: Path) -> list[tuple[str, str, bool]]:
    """(layer imported, imported module, at module level?) for imports of a package above this file's."""
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) < 2 or rel.parts[0] not in LAYERS:
        return []
    own = LAYERS.index(rel.parts[0])
    found = []
    for name, top in _imports(path):
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in LAYERS and LAYERS.index(parts[1]) > own:
            found.append((parts[1], name, top))
    return found


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), f"give {sorted(packages - set(LAYERS))} a place in LAYERS"


def test_no_module_imports_a_package_above_its_own_at_module_level():
    bad = [f"{p.relative_to(PACKAGE.parent)} imports {name}" for p in _files() for layer, name, top in _upward(p) if top]
    assert not bad, "\n".join(bad)


def test_imports_that_reach_up_from_a_function_are_only_the_known_debt():
    found = {(str(p.relative_to(PACKAGE.parent)), layer) for p in _files() for layer, _name, _top in _upward(p)}
    assert not found - UPWARD_DEBT, f"new upward imports: {sorted(found - UPWARD_DEBT)}"
    assert not UPWARD_DEBT - found, f"fixed: remove from UPWARD_DEBT {sorted(UPWARD_DEBT - found)}"


def test_no_module_level_import_cycle():
    modules = {_module_name(p): p for p in _files()}
    graph = {m: {n for n, top in _imports(p) if top and n in modules and n != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (cycle := visit(n, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


@pytest.mark.parametrize("source, upward", [("from compresspipe.run.executor import run_recipe\n", True),
                                            ("from compresspipe.errors import InputError\n", False)])
def test_the_check_sees_an_upward_import(tmp_path, monkeypatch, source, upward):
    """The test above cannot pass by seeing nothing: a module-level import of run from recipe is caught."""
    fake = tmp_path / "compresspipe" / "recipe"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text(source, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "compresspipe")
    assert bool([u for u in _upward(fake / "bad.py") if u[2]]) == upward


def test_no_module_imports_a_private_name_of_another():
    """A name with a leading underscore is its module's own; one another module needs is public (and tested so)."""
    bad = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compresspipe"):
                bad += [f"{path.relative_to(PACKAGE.parent)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)
