"""The house stays one-way: import-linter's contracts from pyproject.toml, and no module in an import circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).parent.parent


def test_import_linter_contracts_are_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint is not None, "import-linter is part of the dev extra"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), i.e. import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(module: str) -> None:
        nonlocal counter
        index[module] = low[module] = counter
        counter += 1
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_sits_in_an_import_circle() -> None:
    # Imports made only for type checking count too: a circle there is a layering mistake all the same.
    graph = grimp.build_graph("workbench")
    for package in [m for m in graph.modules if graph.find_children(m)]:
        # A package's __init__ re-exports its children; that is not a circle between the children.
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_every_workbench_attribute_name_lives_in_tracing_attributes() -> None:
    # A span attribute spelt out elsewhere drifts from the one readers query; module paths are not attributes.
    import ast

    modules = set(grimp.build_graph("workbench").modules)
    stray = []
    for path in (ROOT / "workbench").rglob("*.py"):
        if path.name == "attributes.py" and path.parent.name == "tracing":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("workbench."):
                if node.value not in modules and not any(node.value.startswith(m + ":") for m in modules):
                    stray.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert stray == []
