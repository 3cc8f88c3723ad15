"""The house rules of the code base, read from the code itself (ast, no imports executed).

- layers: ferret_runtime <- ferret_train <- ferret_export; nothing imports a higher layer;
- no import circles between modules (a circle means a third concept hides in one of them);
- no private name (``_x``) imported from another module;
- every package module at most 400 lines.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("ferret_runtime", "ferret_train", "ferret_export")
LAYER = {name: i for i, name in enumerate(PACKAGES)}
MAX_LINES = 400


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _owner(name: str) -> str | None:
    """The module that defines ``name`` (a module, or a name inside one)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import statement, anywhere in the file."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full, None) if full in modules() else (base, a.name))
    return out


@cache
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules()}
    for m in modules():
        for target, _ in _imports(m):
            owner = _owner(target)
            if owner and owner != m:
                edges[m].add(owner)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_circle():
    # the finder itself, on a graph with one circle of three and a tail: a vacuous finder would pass below
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_no_import_from_a_higher_layer():
    up = [(m, t) for m, targets in graph().items() for t in targets
          if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert up == []


def test_no_private_name_imported_across_modules():
    private = [(m, target, name) for m in modules() for target, name in _imports(m)
               if name and name.startswith("_") and not name.startswith("__") and _owner(target) not in (None, m)]
    assert private == []


def test_package_modules_stay_small():
    assert len(modules()) > 50  # the walk found the packages
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
