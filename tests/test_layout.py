"""Where things stand: the library never imports the command line, and no two
modules import each other (directly or round a longer loop), counting imports
inside functions too. Read from the source with `ast`, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rsjax"
# Modules that are the command line: the dispatcher, each command's options and
# printing, and the benchmark and experiment commands.
COMMAND_LINE = ("rsjax.cli", "rsjax.commands", "rsjax.bench")
COMMAND_MODULES = COMMAND_LINE + ("rsjax.experiments", "rsjax.train", "rsjax.evaluate",
                                  "rsjax.synthesize", "rsjax.build_dataset", "rsjax.html_report")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported(name: str, source: str) -> set[str]:
    """The rsjax modules `source` (module `name`) imports, anywhere in it; `from
    package import submodule` counts as the submodule."""
    package = name if MODULES.get(name, Path()).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    # A module importing its own package (for a sibling) is not an edge back.
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    return {name: imported(name, source) & set(modules) for name, source in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_never_imports_the_command_line():
    offenders = {name: sorted(m for m in imported(name, path.read_text())
                              if _within(m, COMMAND_LINE))
                 for name, path in MODULES.items() if not _within(name, COMMAND_MODULES)}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules importing the command line: {offenders}"
    # The check reaches data/, models/ and trainers/ (it would pass on an empty tree).
    assert {"rsjax.data.ingest", "rsjax.models.spade", "rsjax.trainers.checkpoints",
            "rsjax.predict"} <= set(MODULES)


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph({name: path.read_text() for name, path in MODULES.items()})
    assert cycles(graph) == []


@pytest.mark.parametrize("sources, expected", [
    # a pair, a loop of three through a function-level import, no loop
    ({"rsjax.a": "import rsjax.b", "rsjax.b": "from rsjax import a"}, [["rsjax.a", "rsjax.b"]]),
    ({"rsjax.a": "from rsjax.b import x", "rsjax.b": "def f():\n    import rsjax.c",
      "rsjax.c": "from rsjax.a import y"}, [["rsjax.a", "rsjax.b", "rsjax.c"]]),
    ({"rsjax.a": "import rsjax.b", "rsjax.b": "import numpy"}, []),
])
def test_the_cycle_check_finds_loops(sources, expected, monkeypatch):
    monkeypatch.setitem(globals(), "MODULES", {n: Path(n) for n in sources})
    assert cycles(import_graph(sources)) == expected


def test_the_command_line_check_names_a_library_module_that_imports_cli():
    source = "def save():\n    from rsjax import cli\n    cli.print_json({})\n"
    assert "rsjax.cli" in imported("rsjax.trainers.checkpoints", source)
