"""Imports flow one way: utilities <- models <- algorithms <- pipelines <- CLI <- handlers.

Only the handlers (``guard/serving/assets/*.py``, package data TorchServe loads by path) import TorchServe
(``ts``); they and ``benchmarks/`` use the public API only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer of each top-level part of the package; a module may import only its own layer or lower ones
LAYERS = {
    "guard._validation": 0, "guard.data": 0, "guard.registry": 0,
    "guard.models": 1,
    "guard.train": 2, "guard.rescaler": 2, "guard.metrics": 2,
    "guard.attacks": 3, "guard.detect": 3, "guard.repair": 3, "guard.cleanse": 3,
    "guard.serving": 4, "guard.goals": 4, "guard.sweep": 4,
    "guard.cli": 5,
    "guard": 6,  # the package __init__ re-exports
}


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    found.update(f"{mod}.{a.name}" for a in node.names)
                else:
                    found.add(mod)
            else:
                found.add(node.module or "")
    return found


HANDLERS = sorted((ROOT / "guard" / "serving" / "assets").glob("*.py"))
LIBRARY = sorted(set((ROOT / "guard").rglob("*.py")) - set(HANDLERS))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_flow_one_way(path):
    own = _part(_module_name(path))
    own_layer = LAYERS[own]
    for imported in _imports(path):
        if imported.split(".")[0] == "ts":
            pytest.fail(f"{path.relative_to(ROOT)} imports TorchServe ({imported}); only the handlers may")
        if not imported.startswith("guard"):
            continue
        target = _part(imported)
        if target == own:
            continue
        assert LAYERS[target] <= own_layer, (
            f"{path.relative_to(ROOT)} (layer {own_layer}, {own}) imports {imported} (layer {LAYERS[target]})")


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")) + HANDLERS, ids=lambda p: p.name)
def test_benchmarks_and_handlers_use_public_api(path):
    private = [m for m in _imports(path) if m.startswith("guard") and any(p.startswith("_") for p in m.split("."))]
    assert not private, f"{path.name} imports private modules {private}"


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the guard package it imports (at any depth of its code, lazily or not)."""
    modules = {_module_name(p): p for p in LIBRARY}

    def resolve(name: str) -> str | None:  # ``guard.cli.CLIError`` -> ``guard.cli``
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(i) for i in _imports(path) if i.startswith("guard")}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None`` (depth-first search, grey = on the path)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_search_reports_the_path():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycles_between_modules():
    graph = _import_graph()
    assert "guard.cli._common" in graph["guard.cli.poison"], "the graph must see the package's own imports"
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
