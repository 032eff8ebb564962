"""No import cycle inside `pipeline/`: the package is layered (errors and redaction at the bottom, then config,
shards, stages, engine, launchers, and the command-line entry points on top).

The import graph is built statically from the source with `ast`, so a cycle is found whether or not any test
happens to import the modules in the order that breaks:

- every `import` and `from ... import` of a package module counts, at module level and inside functions alike (an
  import moved into a function to dodge a cycle is still a cycle; lazy imports of third-party packages such as
  torch or deeplake are not package-internal and do not count); only `if TYPE_CHECKING:` blocks are skipped, as
  they never run;
- relative imports are resolved, and `from pkg import name` points at the submodule `pkg.name` when there is one,
  else at `pkg` itself; importing `pkg.sub.mod` runs `pkg/sub/__init__.py` first, so what that file imports at
  import time (its re-exports) counts as imported too, unless the importer lives in `pkg.sub` itself;
- a module that imports by name (`importlib.import_module`) gets an edge to every package module it names in a
  string literal: registries such as the stage and launcher tables.

Every strongly connected component of more than one module is a cycle; the test names each one with a concrete
path through it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _nodes(tree: ast.AST):
    """(node, at import time) for every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks (their
    `else:` still runs). At import time: not inside a function body."""
    stack = [(tree, True)]
    while stack:
        node, top = stack.pop()
        yield node, top
        if _type_checking(node):
            stack.extend((n, top) for n in node.orelse)
            continue
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((n, inner) for n in ast.iter_child_nodes(node))


def _module_imports(mod: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(every package module `mod` imports, those it imports at import time)."""
    pkg = mod.split(".")[0]
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    every: set[str] = set()
    at_import: set[str] = set()
    imports_by_name = False
    literals: set[str] = set()
    for node, top in _nodes(tree):
        found: set[str] = set()
        if isinstance(node, ast.Import):
            found = {alias.name for alias in node.names if alias.name in mods}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == pkg:
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in mods else target)
                found &= set(mods)
        elif isinstance(node, ast.Call):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) in ("import_module",
                                                                                              "__import__"):
                imports_by_name = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
            literals.add(node.value)
        every |= found
        if top:
            at_import |= found
    if imports_by_name:
        every |= literals
    every.discard(mod)      # a package naming one of its own attributes: nothing new is imported
    at_import.discard(mod)
    return every, at_import


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (see the module docstring for what counts)."""
    mods = package_modules(root)
    imports = {mod: _module_imports(mod, path, mods) for mod, path in mods.items()}
    graph: dict[str, set[str]] = {}
    for mod, (every, _) in imports.items():
        base = mod.split(".") if mods[mod].name == "__init__.py" else mod.split(".")[:-1]
        own = {".".join(base[:i]) for i in range(1, len(base) + 1)}
        edges = set(every)
        # importing a.b.c first runs a/b/__init__.py: what that runs at import time is imported too (a package
        # the importer itself lives in is being imported already)
        for target in every:
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and parent not in own:
                    edges |= imports[parent][1]
        edges.discard(mod)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component: its first module back to itself (BFS)."""
    members = set(component)
    start = component[0]
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return component


def describe(graph: dict[str, set[str]]) -> list[str]:
    """Per cycle: one path through it, then every import inside it (the links to break)."""
    out = []
    for comp in cycles(graph):
        links = "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp)
        out.append(f"{len(comp)} modules: " + " -> ".join(cycle_path(graph, comp)) + f"\n    imports inside: {links}")
    return out


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was really built
    problems = describe(graph)
    assert not problems, "import cycles in pipeline/:\n  " + "\n  ".join(problems)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # a module-level import each way
    ({"a.py": "from . import b\n", "b.py": "from .a import x\n"}, [["pkg.a", "pkg.b"]]),
    # one side hides its import in a function: still a cycle
    ({"a.py": "def f():\n    from .b import y\n", "b.py": "from .a import x\n"}, [["pkg.a", "pkg.b"]]),
    # three modules, absolute and relative imports, one in a subpackage reached with `..`
    ({"a.py": "import pkg.b\n", "b.py": "from .sub.c import z\n", "sub/__init__.py": "",
      "sub/c.py": "from ..a import x\n"}, [["pkg.a", "pkg.b", "pkg.sub.c"]]),
    # a registry that imports by name
    ({"__init__.py": "import importlib\nREG = {'x': 'pkg.a'}\ndef get(n):\n    return importlib.import_module(REG[n])\n",
      "a.py": "from . import get\n"}, [["pkg", "pkg.a"]]),
    # a package __init__ that re-exports: importing its harmless submodule still runs the re-exported one
    ({"a.py": "def f():\n    from .sub.layout import y\n", "sub/__init__.py": "from .w import g\n",
      "sub/layout.py": "", "sub/w.py": "from ..a import x\n"}, [["pkg.a", "pkg.sub.w"]]),
    # ... but a submodule importing from its own package is not a cycle with the package
    ({"sub/__init__.py": "from .w import g\n", "sub/w.py": "from .layout import y\n", "sub/layout.py": "",
      "a.py": "from .sub import g\n"}, []),
    # no cycle: a type-only import, a third-party lazy import, a one-way chain
    ({"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import y\n",
      "b.py": "from .a import x\ndef f():\n    import torch\n"}, []),
])
def test_the_cycle_finder_on_small_packages(tmp_path, files, expected):
    """The finder itself, on packages whose cycles are known by construction."""
    root = _write(tmp_path / "pkg", {"__init__.py": "", **files})
    graph = import_graph(root)
    assert cycles(graph) == expected
    for comp in expected:
        path = cycle_path(graph, comp)
        assert path[0] == path[-1] and set(path) == set(comp)
        assert all(b in graph[a] for a, b in zip(path, path[1:]))
