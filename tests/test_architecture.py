"""The package's layering, as docs/architecture.md draws it, checked on every import in easyppo/.

Each module belongs to one layer; a module may import its own layer and the layers below it, never a
layer above, and the import graph has no cycle. Function-level and ``TYPE_CHECKING`` imports count
too: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent / "easyppo"

# Bottom to top. A module belongs to the first layer whose prefix it starts with (exact name or
# ``prefix.``); the package itself and the ``python -m`` entry modules sit with the CLI.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("easyppo.core",)),
    ("models", ("easyppo.models",)),
    ("weights", ("easyppo.weights",)),
    ("data", ("easyppo.data",)),
    ("rewards", ("easyppo.rewards",)),
    ("algorithms", ("easyppo.algorithms",)),
    ("run", ("easyppo.run",)),
    ("plan", ("easyppo.plan",)),
    ("configs", ("easyppo.configs",)),
    ("cli", ("easyppo.cli", "easyppo.train", "easyppo.__main__", "easyppo")),
)
# About 400 lines: a module a reader holds in their head.
MAX_MODULE_LINES = 400


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"module {module} belongs to no layer; add its package to LAYERS")


def imported_modules(source: str, importer: str, known: set[str]) -> set[str]:
    """The easyppo modules ``source`` imports anywhere (``from a import b`` counts ``a.b`` when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "easyppo")
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{importer}: relative import (line {node.lineno}); import by absolute name"
            base = node.module or ""
            if base.split(".")[0] != "easyppo":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def import_graph(root: pathlib.Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    files = {module_name(path): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    return {module: imported_modules(path.read_text(), module, known) - {module} for module, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for importer, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(importer)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


# ----------------------------------------------------------------------------------- the package


def test_every_module_belongs_to_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_no_module_is_longer_than_the_budget():
    long = {
        module_name(path): n
        for path in PACKAGE_ROOT.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


# ------------------------------------------------------------------------------- the checker itself


@pytest.fixture()
def fake_package(tmp_path):
    def make(files: dict[str, str]) -> dict[str, set[str]]:
        for name, text in files.items():
            path = tmp_path / "easyppo" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        files = {module_name_in(tmp_path, p): p for p in (tmp_path / "easyppo").rglob("*.py")}
        known = set(files)
        return {m: imported_modules(p.read_text(), m, known) - {m} for m, p in files.items()}

    return make


def module_name_in(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_checker_sees_a_function_level_upward_import(fake_package):
    graph = fake_package(
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/ops.py": "def f():\n    from easyppo.run import loop\n",
            "run/__init__.py": "",
            "run/loop.py": "",
        }
    )
    assert upward_imports(graph) == ["easyppo.core.ops (core) imports easyppo.run.loop (run)"]


def test_the_checker_finds_a_cycle_within_a_layer(fake_package):
    graph = fake_package(
        {
            "__init__.py": "",
            "models/__init__.py": "",
            "models/a.py": "from easyppo.models import b\n",
            "models/b.py": "from easyppo.models.a import thing\n",
        }
    )
    assert find_cycle(graph) == ["easyppo.models.a", "easyppo.models.b", "easyppo.models.a"]
