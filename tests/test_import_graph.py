"""The import graph of gmic_jax/ and benchmarks/, read from the source (no module is imported):
no import cycle, and few imports inside functions (optional dependencies and the command lines'
one import of the library after parsing)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gmic_jax", "benchmarks")
MAX_FUNCTION_LOCAL_IMPORTS = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    files = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
    return {_module_name(p): (p, ast.parse(p.read_text(), filename=str(p))) for p in files}


def _imported_names(module: str, path: Path, tree: ast.Module):
    """Every module name an import statement of ``tree`` (anywhere in it) may refer to."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """{module: the modules of PACKAGES it imports} (benchmarks import each other by bare name)."""
    modules = _modules()
    graph = {}
    for module, (path, tree) in modules.items():
        targets = set()
        for name in _imported_names(module, path, tree):
            targets.update(c for c in (name, f"benchmarks.{name}") if c in modules and c != module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def function_local_imports() -> list[str]:
    """'path:line' of every import statement inside a function (each counted once)."""
    out = set()
    for path, tree in _modules().values():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        out.add(f"{path.relative_to(REPO)}:{node.lineno}")
    return sorted(out)


def test_the_graph_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_train():
    graph = import_graph()
    train = [c for c in cycles(graph) if any(m.startswith("gmic_jax.train") for m in c)]
    assert not train, f"import cycles: {train}"


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_few_function_local_imports():
    local = function_local_imports()
    assert len(local) <= MAX_FUNCTION_LOCAL_IMPORTS, f"{len(local)} imports inside functions:\n" + "\n".join(local)
