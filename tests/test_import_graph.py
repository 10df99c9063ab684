"""The import graph of ``megarec/`` (read with ast, nothing executed): no circles, and every import points
to the importing file's own floor or a lower one, the floors being those ``docs/ARCHITECTURE.md`` lists.

Every import counts, at module level or inside a function, ``TYPE_CHECKING`` ones too: a reader of the
code follows them all. Plug-ins are named by string in their registries (``megarec.methods``,
``megarec.methods.tokenizers``), so a registry reaches them without an import edge.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "megarec"


def floors() -> list[tuple[str, list[str]]]:
    """``[(floor name, [module prefixes])]`` top to bottom, from the ``Floors`` block of docs/ARCHITECTURE.md:
    lines ``N. name: prefix prefix ...``."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## Floors", 1)[1]
    rows = re.findall(r"^\s+(\d+)\. ([^:]+):\s+(.+)$", block, re.M)
    assert rows, "docs/ARCHITECTURE.md: no floors listed under '## Floors'"
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1)), "floors are numbered 1, 2, ... in order"
    return [(name.strip(), mods.split()) for _, name, mods in rows]


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ``megarec`` that an import of ``name`` reads (a package's ``__init__`` or a file)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for me, path in mods.items():
        pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                # `from pkg import mod` imports pkg.mod when that is a module
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for n in names:
                target = resolve(n, mods) if n.startswith("megarec") else None
                if target and target != me:
                    graph[me].add(target)
    return graph


def floor_of(module: str, table: list[tuple[str, list[str]]]) -> int:
    """Index of the floor whose longest listed prefix covers ``module`` (the package root only by itself)."""
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(table):
        for p in prefixes:
            covers = module == p if p == "megarec" else module == p or module.startswith(p + ".")
            if covers and p.count(".") > depth:
                best, depth = i, p.count(".")
    if best is None:
        raise AssertionError(f"{module} is on no floor of docs/ARCHITECTURE.md: add it to one")
    return best


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert circles(edges(modules())) == []


def test_imports_point_down_the_floors():
    table, graph = floors(), edges(modules())
    up = [f"{a} ({table[floor_of(a, table)][0]}) imports {b} ({table[floor_of(b, table)][0]})"
          for a, targets in sorted(graph.items()) for b in sorted(targets)
          if floor_of(b, table) < floor_of(a, table)]
    assert up == []


def test_every_module_is_on_a_floor():
    table = floors()
    for m in modules():
        floor_of(m, table)


@pytest.mark.parametrize("case", ["circle", "upward"])
def test_the_checks_catch_what_they_guard_against(case):
    """The graph helpers on a made-up graph: a circle is found, an upward import is seen as one."""
    if case == "circle":
        assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    else:
        table = [("top", ["megarec.cli"]), ("bottom", ["megarec.data", "megarec"])]
        assert floor_of("megarec.data.codes", table) == 1 and floor_of("megarec", table) == 1
        assert floor_of("megarec.cli", table) == 0
        with pytest.raises(AssertionError, match="no floor"):
            floor_of("megarec.unlisted", table)
