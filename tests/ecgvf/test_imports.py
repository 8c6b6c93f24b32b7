"""The ecgvf modules import one another one way only: no cycle, counting imports inside functions
(a cycle hidden in a function still ties the modules together and breaks a partial import)."""

import ast
from pathlib import Path

import earkit.ecgvf

PACKAGE = "earkit.ecgvf"
FOLDER = Path(earkit.ecgvf.__file__).parent


def module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it (relative or absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from . import x
                base = PACKAGE.rsplit(".", node.level - 1)[0] if node.level > 1 else PACKAGE
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # from . import metrics
    return {name for name in found if name in modules} - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(FOLDER.glob("*.py"))
    modules = {module_name(path) for path in paths}
    # the package's __init__ re-exports its modules; a module importing a sibling never needs it
    return {module_name(p): imported_modules(p, modules) - {PACKAGE} for p in paths if p.name != "__init__.py"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert f"{PACKAGE}.images" in graph[f"{PACKAGE}.evaluate"]  # imported in evaluate() only
    assert f"{PACKAGE}.metrics" in graph[f"{PACKAGE}.evaluate"]  # from . import metrics
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_ecgvf_modules_import_one_another_without_a_cycle():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert f"{PACKAGE}.summary" in graph[f"{PACKAGE}.report"] and f"{PACKAGE}.evaluate" not in graph[f"{PACKAGE}.report"]
