"""The import graph of jmoe's modules has no cycles (a static check over the source with `ast`).

Edges are the module-level imports (those run when a module is imported; imports inside
functions and under `if TYPE_CHECKING:` are not). `from pkg import name` is an edge to the
submodule `pkg.name` when there is one, else to `pkg`. Importing a submodule also runs its
parent packages' `__init__`, which is not counted as an edge: a package may import its own
submodules. Inside `jmoe.dispatch` the check is stricter and counts the imports inside
functions too, so its layers form a DAG however they are imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "jmoe"


def module_files(package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, function_level: bool):
    """The Import/ImportFrom nodes that run when the module is imported (and, with
    `function_level`, those inside functions)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not function_level:
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(function_level_in: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """{module: jmoe modules it imports}. Imports inside functions count for the modules under
    the prefixes `function_level_in`, toward modules under the same prefix."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        prefix = next((p for p in function_level_in if module == p or module.startswith(p + ".")), None)
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in _imports(tree, function_level=False)}
        edges = set()
        for node in _imports(tree, function_level=prefix is not None):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _resolve_from(module, is_package, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            for target in targets:
                if target not in files:
                    continue
                nested = id(node) not in top
                if nested and not (target == prefix or target.startswith(prefix + ".")):
                    continue
                edges.add(target)
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(graph, component):
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_the_dispatch_layers():
    graph = import_graph()
    assert "jmoe.dispatch.pallas.tiling" in graph["jmoe.dispatch.pallas.ops"]
    assert "jmoe.dispatch.pallas.gmm_gpu" in graph["jmoe.dispatch.pallas.ops"]  # `from pkg import submodule`
    assert "jmoe.dispatch.sorting" in graph["jmoe.dispatch.capacity"]


def test_jmoe_module_level_imports_form_a_dag():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(graph, c) for c in found)


@pytest.mark.parametrize("package", ["jmoe.dispatch"])
def test_all_imports_inside_package_form_a_dag(package):
    graph = import_graph(function_level_in=(package,))
    found = [c for c in cycles(graph) if all(m == package or m.startswith(package + ".") for m in c)]
    assert not found, "import cycles: " + " | ".join(_describe(graph, c) for c in found)
