"""The package's architecture, checked: imports point one way, with no cycles.

    models <- decoding <- parallel <- io <- planning <- train <- bench <- cli

A module may import its own subpackage or a lower one, never a higher one, and never the root
package (whose __init__ re-exports the public API from all of them). Imports inside functions
are kept for the heavy optional libraries only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hsd_jax"
LAYERS = ("models", "decoding", "parallel", "io", "planning", "train", "bench", "cli")
LAZY_ALLOWED = ("torch", "transformers", "matplotlib", "safetensors.torch", "llama_cpp")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The hsd_jax module an import of `name` loads last (a submodule, else its package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, imported inside a function, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in inside, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in inside, node.lineno))
            found += [(f"{node.module}.{alias.name}", id(node) in inside, node.lineno) for alias in node.names
                      if f"{node.module}.{alias.name}" in MODULES]
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(path):
            target = _resolve(name) if name.startswith("hsd_jax") else None
            if target and target != module:
                graph[module].add(target)
    return graph


def test_every_module_sits_in_a_layer():
    loose = [m for m in MODULES if m != "hsd_jax" and _layer(m) is None]
    assert not loose, f"modules outside the layered subpackages {LAYERS}: {loose}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "hsd_jax"])
def test_imports_point_down(module):
    own = _layer(module)
    upward = []
    for name, _, line in _imports(MODULES[module]):
        if not name.startswith("hsd_jax"):
            continue
        target = _resolve(name)
        if target == "hsd_jax":
            upward.append(f"line {line}: imports the root package `hsd_jax` (import the subpackage instead)")
        elif target is not None and _layer(target) is not None and _layer(target) > own:
            upward.append(f"line {line}: {LAYERS[own]} imports {name} ({LAYERS[_layer(target)]} is above it)")
    assert not upward, f"{module}: " + "; ".join(upward)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_lazy_imports_only_for_heavy_optional_libraries(module):
    lazy = [(name, line) for name, inside, line in _imports(MODULES[module]) if inside
            and not any(name == lib or name.startswith(lib + ".") for lib in LAZY_ALLOWED)]
    assert not lazy, f"{module} imports inside functions: {lazy}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_is_too_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 460}
    assert not long, f"modules over ~450 lines: {long}"
