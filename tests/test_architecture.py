"""The package's shape, checked from its source: no import circles (lazy imports counted), files and functions of
a readable size (or a stated reason), and a docstring on every public name. Read with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prefixvqa"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its body (top level, in functions, under TYPE_CHECKING
    excluded: those are for the type checker only and never run)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.Call) and _is_import_module(node):
                targets = [_import_module_target(node, package)]
            for target in targets:
                if target in mods and target != name:
                    graph[name].add(target)
    return graph


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "import_module" and bool(node.args) and isinstance(node.args[0], ast.Constant)


def _import_module_target(node: ast.Call, package: str) -> str:
    target = node.args[0].value
    if target.startswith(".") and len(node.args) > 1:
        return package + target  # importlib.import_module(".name", __name__) inside a package's __init__
    return target


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_reason(lines: list[str]) -> bool:
    return any(line.lstrip().startswith(LONG_MARK) for line in lines)


def test_files_and_functions_are_readable_sizes():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_FILE_LINES and not _long_reason(lines[:40]):
            too_long.append(f"{path.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = lines[node.lineno - 1: node.end_lineno]
                if len(body) > MAX_FUNCTION_LINES and not _long_reason(lines[node.lineno - 3: node.lineno + 3]):
                    too_long.append(f"{name}.{node.name}: {len(body)} lines")
    assert too_long == []


def undocumented() -> list[str]:
    """Public modules, classes, functions and methods without a docstring (dunder methods and overrides of a base
    class method that has one are exempt: `forward`, `__call__`, ...)."""
    missing = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree) and not path.name.startswith("_") or \
                (path.name == "__init__.py" and not ast.get_docstring(tree)):
            missing.append(name)
        documented = {node.name: {f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                                  and ast.get_docstring(f)} for node in tree.body if isinstance(node, ast.ClassDef)}
        missing += [f"{name}.{n}" for n in _undocumented_in(tree.body, "", documented)]
    return missing


_EXEMPT = {"forward", "extra_repr", "setUp", "tearDown"}


def _undocumented_in(body: list[ast.stmt], prefix: str, documented: dict[str, set[str]],
                     inherited: set[str] = frozenset()) -> list[str]:
    """Undocumented public names in `body`; `inherited` are method names a base class in the file documents."""
    out = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            public = not node.name.startswith("_") and node.name not in _EXEMPT
            if public and node.name not in inherited and not ast.get_docstring(node):
                out.append(prefix + node.name)
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = set()
                for base in node.bases:
                    bases |= _ancestors(getattr(base, "id", ""), documented, body)
                out += _undocumented_in(node.body, f"{prefix}{node.name}.", documented, bases)
    return out


def _ancestors(name: str, documented: dict[str, set[str]], body: list[ast.stmt]) -> set[str]:
    """Documented method names of class `name` and its bases in the same file."""
    out = set(documented.get(name, ()))
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            for base in node.bases:
                out |= _ancestors(getattr(base, "id", ""), documented, body)
    return out


def test_every_public_name_has_a_docstring():
    assert undocumented() == []
