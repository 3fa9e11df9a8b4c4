"""Imports flow one way: utilities <- models <- algorithms <- pipelines <- CLI <- handlers.

Only ``handlers/`` imports TorchServe (``ts``); ``benchmarks/`` use the public API only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer of each top-level part of the package; a module may import only its own layer or lower ones
LAYERS = {
    "guard._validation": 0, "guard.data": 0,
    "guard.models": 1,
    "guard.train": 2, "guard.rescaler": 2, "guard.metrics": 2,
    "guard.attacks": 3, "guard.detect": 3, "guard.repair": 3, "guard.cleanse": 3,
    "guard.serving": 4,
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


LIBRARY = sorted((ROOT / "guard").rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_flow_one_way(path):
    own = _part(_module_name(path))
    own_layer = LAYERS[own]
    for imported in _imports(path):
        if imported.split(".")[0] == "ts":
            pytest.fail(f"{path.relative_to(ROOT)} imports TorchServe ({imported}); only handlers/ may")
        if not imported.startswith("guard"):
            continue
        target = _part(imported)
        if target == own:
            continue
        assert LAYERS[target] <= own_layer, (
            f"{path.relative_to(ROOT)} (layer {own_layer}, {own}) imports {imported} (layer {LAYERS[target]})")


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_use_public_api(path):
    private = [m for m in _imports(path) if m.startswith("guard") and any(p.startswith("_") for p in m.split("."))]
    assert not private, f"{path.name} imports private modules {private}"
