"""The package's import graph: no cycles, and every import points down the layer order of README's map.

Read from the source with `ast` (nothing is imported), so a violation names the file and line.
Function-body imports are allowed only for optional heavy dependencies (outside `ofa_ufo`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ofa_ufo"

# Folder (or module) -> layer; a module may import its own layer or lower ones. The same order as README's map.
LAYERS = {
    "core": 0, "resources": 0,
    "layers": 1,
    "models": 2,
    "generation": 3, "metrics": 3,
    "tasks": 4,
    "hf": 5,
    "data": 6,
    "deploy": 7, "converters": 7,
    "training": 8,
    # command-line modules: nothing in the library imports them
    "cli": 9, "evaluate": 9, "export": 9, "search": 9, "__main__": 9, "training.__main__": 9, "data.convert": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    """The layer of a module: its longest listed prefix (`training.__main__` before `training`)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    return None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The `ofa_ufo` module an imported name lives in (`ofa_ufo.tasks.get_task` -> `tasks`)."""
    if name != "ofa_ufo" and not name.startswith("ofa_ufo."):
        return None
    name = name.removeprefix("ofa_ufo").removeprefix(".")
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _walk(tree: ast.AST):
    """(import node, inside a function, inside `if TYPE_CHECKING:`) for every import statement."""
    def visit(node, in_function, type_only):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function, type_only
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            typing = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            yield from visit(child, nested, typing)
    yield from visit(tree, False, False)


def _package_chain(importer: str, module: str) -> list[str]:
    """Importing `a.b.c` first runs the `__init__` of `a` and `a.b`; the root package's and those of the
    importer's own packages (already running when it is imported) are left out."""
    parts = module.split(".")
    packages = [".".join(parts[:end]) for end in range(1, len(parts))]
    return [p for p in packages if p in MODULES and not importer.startswith(p + ".")]


def build_graph() -> tuple[dict[str, set[str]], list[str], list[str], list[str]]:
    """Edges of module-level imports, plus the violations: function-body imports of ofa_ufo, those of
    other packages without a comment saying why they wait (an optional or heavy dependency), and
    `from . import` forms (the graph needs absolute names)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    body_imports, unexplained, relative = [], [], []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node, in_function, type_only in _walk(ast.parse(source)):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.level:
                relative.append(where)
            targets = [t for t in (_resolve(name) for name in _imports(node)) if t is not None]
            if in_function and targets:
                body_imports.append(f"{where} {ast.unparse(node)}")
            elif in_function and not any("#" in line for line in lines[node.lineno - 2 : node.end_lineno]):
                unexplained.append(f"{where} {ast.unparse(node)}")
            if in_function or type_only:
                continue
            for target in targets:
                edges[module] |= {t for t in [*_package_chain(module, target), target] if t and t != module}
    return edges, body_imports, unexplained, relative


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


EDGES, BODY_IMPORTS, UNEXPLAINED, RELATIVE = build_graph()


def test_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m and layer(m) is None] == []


def test_no_import_cycle():
    assert cycles(EDGES) == []


def test_imports_point_down_the_layers():
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in EDGES.items() if m
              for t in sorted(targets) if t and layer(t) > layer(m)]
    assert upward == []


def test_no_function_body_imports_of_the_package():
    assert BODY_IMPORTS == []


def test_function_body_imports_say_why():
    assert UNEXPLAINED == []


def test_imports_are_absolute():
    assert RELATIVE == []


@pytest.mark.parametrize("stem", sorted({p.stem for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}))
def test_no_two_modules_share_a_stem(stem):
    assert len([p for p in PACKAGE.rglob(f"{stem}.py")]) == 1, f"{stem}.py exists in several folders"
