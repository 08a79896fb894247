"""The package's layout keeps its arrows pointing down (ARCHITECTURE.md §7).

Every ``import`` in ``devstate/`` is read with :mod:`ast` (imports inside functions too: a
lazy import is still a dependency, and the spec <-> devices circle hid behind one). A
module's *room* is its sub-package (``devstate.net.channels`` is in ``net``); rooms sit on
floors, and a module may import its own room or a room on a lower floor, nothing else.
Separately, no set of modules may import each other in a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "devstate"

# Top to bottom. Rooms on one floor do not import each other.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("__init__", "__main__"),
    ("cli",),
    ("qmp",),
    ("migration",),
    ("worker",),
    ("devices", "planning"),
    ("net",),
    ("config",),
    ("arena", "report", "protocol"),
    ("lifecycle", "errors", "phase"),
)
# Rooms that may import less than their floor allows: a wire format knows nothing but its
# own errors.
ONLY = {"protocol": {"protocol", "errors"}}


def modules(root: Path) -> dict[str, Path]:
    """Every module under ``root`` (a package directory), by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The modules of ``known`` that module ``name`` imports, with the line of each."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` imports the module pkg.mod where there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of an attribute path
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def room(module: str) -> str:
    """The room of a dotted module name: its first part below the top package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(room_name: str) -> int:
    """The floor of a room; KeyError for a room no floor names (a new room needs a place)."""
    for level, rooms in enumerate(FLOORS):
        if room_name in rooms:
            return level
    raise KeyError(room_name)


def upward_imports(root: Path) -> list[str]:
    """Every import that goes against the floors, as ``file:line: a -> b (why)``."""
    found = modules(root)
    bad = []
    for name, path in found.items():
        here = room(name)
        for target, line in imports(name, path, set(found)):
            there = room(target)
            if there == here:
                continue
            try:
                ok = floor_of(there) > floor_of(here) and there in ONLY.get(here, {there})
            except KeyError as exc:
                bad.append(f"{path}:{line}: room {exc} is on no floor")
                continue
            if not ok:
                bad.append(f"{path}:{line}: {name} -> {target} ({here} may not import {there})")
    return list(dict.fromkeys(bad))


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected sets of more than one module (or a module importing itself)."""
    found = modules(root)
    graph = {name: sorted({t for t, _ in imports(name, path, set(found))})
             for name, path in found.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for name in graph:
        if name not in index:
            visit(name)
    return out


def test_devstate_has_no_import_cycle() -> None:
    assert cycles(PACKAGE) == []


def test_every_import_points_down_the_floors() -> None:
    assert upward_imports(PACKAGE) == []


def test_every_room_is_on_a_floor() -> None:
    rooms = {room(name) for name in modules(PACKAGE)}
    placed = {r for floor in FLOORS for r in floor}
    assert rooms <= placed, f"rooms on no floor: {sorted(rooms - placed)}"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small package laid out like devstate, with one arrow of each kind."""
    root = tmp_path / "devstate"
    for pkg in ("", "net", "config", "protocol", "devices"):
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "config" / "spec.py").write_text("from devstate.errors import x\n")
    (root / "net" / "channels.py").write_text("from devstate.config import spec\n"
                                               "from devstate.protocol.wire import y\n")
    (root / "protocol" / "wire.py").write_text("from devstate import errors\n")
    (root / "devices" / "base.py").write_text("from . import kvm\n")
    (root / "devices" / "kvm.py").write_text("def f():\n    from devstate.devices import base\n")
    return root


def test_the_checks_find_an_upward_import_and_a_circle(tree: Path) -> None:
    assert upward_imports(tree) == []
    assert cycles(tree) == [["devstate.devices.base", "devstate.devices.kvm"]]
    # An upward import, hidden in a function as the spec -> devices one was.
    (tree / "config" / "spec.py").write_text("def table():\n"
                                             "    from devstate.net.channels import z\n")
    assert upward_imports(tree) == [
        f"{tree}/config/spec.py:2: devstate.config.spec -> devstate.net.channels "
        "(config may not import net)"]
    assert cycles(tree) == [["devstate.config.spec", "devstate.net.channels"],
                            ["devstate.devices.base", "devstate.devices.kvm"]]


def test_protocol_imports_nothing_but_errors(tree: Path) -> None:
    # lifecycle is on a floor below protocol's, but a wire format needs none of it.
    (tree / "lifecycle.py").write_text("")
    (tree / "protocol" / "wire.py").write_text("import devstate.lifecycle\n")
    assert upward_imports(tree) == [
        f"{tree}/protocol/wire.py:1: devstate.protocol.wire -> devstate.lifecycle "
        "(protocol may not import lifecycle)"]
