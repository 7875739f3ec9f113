"""The package layout keeps its shape: each layer imports only the layers below it, and no module
imports itself back through others (type-checking-only imports count: they are cycles a reader
has to untangle all the same).

The layers (README, "How it is built"): ``cli`` and ``experiment`` at the top, then
``simulation``, ``runtime``, ``client``, ``protocol``, ``models``, ``algorithms``, with ``data``
beside them. ``plugins`` (loading ``"pkg.module:name"``) is a leaf anyone may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedguard"

# Which top-level packages each layer may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "algorithms": {"algorithms"},
    "data": {"data", "plugins"},
    "models": {"models", "algorithms", "plugins"},
    "protocol": {"protocol", "models", "algorithms"},
    "client": {"client", "protocol", "models", "algorithms", "data"},
    "runtime": {"runtime", "protocol", "algorithms"},
    "simulation": {"simulation", "runtime", "protocol", "client", "models", "algorithms", "data"},
    "plugins": {"plugins"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def fedguard_imports(path: Path) -> set[str]:
    """Every ``fedguard`` module a file imports, at any depth of the file (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedguard"):
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedguard"))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the fedguard modules it imports (``from pkg import name`` resolved to the module
    ``pkg.name`` when that is a module, else to ``pkg``)."""
    files = {module_name(p): p for p in SRC.rglob("*.py") if "proto" not in p.parts}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in fedguard_imports(path):
            while imported not in files and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in files and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_each_layer_imports_only_the_layers_below() -> None:
    edges = graph()
    wrong = [
        f"{src} imports {dst}"
        for src, targets in sorted(edges.items())
        for dst in sorted(targets)
        if layer(src) in ALLOWED and layer(dst) not in ALLOWED[layer(src) or ""]
    ]
    assert wrong == []
    # the check sees the whole tree: the layers' modules are all there
    assert {layer(m) for m in edges} >= set(ALLOWED) | {"experiment", "cli"}
    assert len(edges) > 80


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected(planted) if len(c) > 1] == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = [c for c in strongly_connected(graph()) if len(c) > 1]
    assert cycles == []
