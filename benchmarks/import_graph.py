"""Figures of a package's layout, read from its source with `ast` (nothing is imported): module count,
import cycles, imports into `training/` or a command-line module from elsewhere, function-body imports,
and the largest file and function. Point it at an older checkout to compare:

    python benchmarks/import_graph.py                       # this tree's ofa_ufo/
    git worktree add /tmp/old 604deae && python benchmarks/import_graph.py /tmp/old/ofa_ufo

Cycles are counted twice: over module-level imports (plus the package `__init__`s an import runs), and
with function-body imports too (a cycle hidden by deferring an import). The layer order itself is
enforced by tests/test_import_graph.py.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_import_graph import cycles  # noqa: E402  (the test's cycle finder, one implementation)

COMMAND_LINES = {"evaluate", "export", "search", "__main__", "training.__main__", "data.convert"}


def is_command_line(module: str) -> bool:
    """The listed command-line modules and everything in `cli/` (the `ofa-ufo` command)."""
    return module in COMMAND_LINES or module == "cli" or module.startswith("cli.")


def modules(package: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def resolve(name: str, known: dict[str, Path]) -> str | None:
    if not name.startswith("ofa_ufo"):
        return None
    name = name.removeprefix("ofa_ufo").removeprefix(".")
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(tree: ast.AST):
    """(imported names, inside a function) for every import statement outside `if TYPE_CHECKING:`."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                yield [a.name for a in child.names], in_function
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                yield [f"{child.module}.{a.name}" for a in child.names], in_function
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from visit(tree, False)


def report(package: Path) -> dict[str, object]:
    known = modules(package)
    edges: dict[str, set[str]] = {m: set() for m in known}
    all_edges: dict[str, set[str]] = {m: set() for m in known}  # function-body imports included
    body, body_package, upward, functions, files = 0, 0, set(), [], []
    for module, path in known.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        files.append((source.count("\n"), str(path.relative_to(package.parent))))
        functions += [(n.end_lineno - n.lineno + 1, f"{path.relative_to(package.parent)}:{n.name}")
                      for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for names, in_function in imports(tree):
            targets = {t for t in (resolve(n, known) for n in names) if t and t != module}
            body += in_function
            body_package += in_function and bool(targets)
            for target in targets:
                into_top = is_command_line(target) or (target.startswith("training") and target != "training")
                if into_top and not (is_command_line(module) or module.startswith("training")):
                    upward.add(f"{module} -> {target}")
                elif is_command_line(target) and not is_command_line(module):
                    upward.add(f"{module} -> {target}")
            for target in targets:
                parts = target.split(".")
                chain = [".".join(parts[:i]) for i in range(1, len(parts))]
                reached = {t for t in (*chain, target) if t in known and t and t != module
                           and not module.startswith(t + ".")}
                all_edges[module] |= reached
                if not in_function:
                    edges[module] |= reached
    found, hidden = cycles(edges), cycles(all_edges)
    return {
        "modules": len(known), "cycles (module-level imports)": [len(c) for c in found],
        "cycles (function-body imports included)": [len(c) for c in hidden],
        "modules in those cycles": sorted(sum(hidden, [])),
        "imports into training/ or a command line": sorted(upward),
        "function-body imports": body, "function-body imports of the package": body_package,
        "largest file (lines)": max(files), "largest function (lines)": max(functions),
        "median function (lines)": statistics.median(n for n, _ in functions),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "ofa_ufo"))
    for name, value in report(Path(parser.parse_args(argv).package).resolve()).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
