"""The package's layers import only downwards (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import qckpt

ROOT = Path(qckpt.__file__).parent
# lower number = lower layer; a module may import its own layer and any lower one
LAYERS = {"errors": 0, "backends": 1, "format": 2, "store": 3, "commit": 4, "ops": 5, "facade": 6, "integrations": 7}
FACADE = {"__init__", "__main__", "repository", "state", "data", "distributed", "cli", "_progress", "testing"}


def _layer(module: str) -> str:
    first = module.split(".")[1] if "." in module else "__init__"
    return "facade" if first in FACADE else first


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported qckpt module, only for type checking) for each import in ``path``."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qckpt"):
            found.append((node.module, id(node) in type_only))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in type_only) for a in node.names if a.name.startswith("qckpt")]
    return found


def test_every_module_has_a_known_layer() -> None:
    for path in ROOT.rglob("*.py"):
        module = ".".join(("qckpt", *path.relative_to(ROOT).with_suffix("").parts))
        assert _layer(module) in LAYERS, module


def test_imports_run_downwards_only() -> None:
    upward = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(("qckpt", *path.relative_to(ROOT).with_suffix("").parts))
        for imported, type_only in _imports(path):
            if imported == "qckpt":
                imported = "qckpt.__init__"
            if LAYERS[_layer(imported)] > LAYERS[_layer(module)] and not (type_only and _layer(module) == "backends"):
                upward.append(f"{module} imports {imported}")
    assert not upward, upward
