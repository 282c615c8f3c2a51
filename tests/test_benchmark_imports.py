"""The benchmarks' import graph: no cycle among benchmarks/*.py, and imports inside functions only
for the optional dependencies (torch, matplotlib, the original release's model, the reference
recipe beside the repository). Reads the sources; imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# Top-level packages a benchmark may import inside a function: optional, or found only at run time.
LAZY_ALLOWED = {"torch", "matplotlib", "PIL", "src", "recipe"}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(BENCH.glob("*.py"))}


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_no_import_cycle_among_the_benchmarks():
    modules = _modules()
    graph = {
        name: {n.split(".")[0] for node in ast.walk(tree) for n in _imported_names(node)} & set(modules) - {name}
        for name, tree in modules.items()
    }
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join([*path[path.index(name) :], name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in modules:
        visit(name)


def test_imports_inside_functions_are_optional_dependencies_only():
    lazy = [
        f"{name}.py:{node.lineno} {n}"
        for name, tree in _modules().items()
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        for n in _imported_names(node)
        if n.split(".")[0] not in LAZY_ALLOWED
    ]
    assert not lazy, f"import these at the top of the module: {lazy}"
