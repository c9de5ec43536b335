"""The project's modules import one another without a cycle.

The graph is the static import graph of the root packages that import-linter checks (pyproject's
`[tool.importlinter] root_packages`), built by grimp. Every import counts, function-local ones
included (a lazy import is still a dependency), except those under `if TYPE_CHECKING:`.

A package's `__init__` counts like any module: when it re-exports a submodule, that submodule
must import its siblings directly, not through the package (`from monitor.store.codec import X`,
not `from monitor.store import X` inside `monitor/store/`). That is a cycle at run time too:
which of the two modules is found half-initialised depends on which one is imported first.
"""

from __future__ import annotations

import tomllib
from itertools import pairwise
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def root_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = config["tool"]["importlinter"]["root_packages"]
    return packages


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The groups of modules that import one another (directly or not), each sorted."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    for module in sorted(graph.modules):
        if module not in seen and (group := graph.find_upstream_modules(module) & graph.find_downstream_modules(module)):
            groups.append(sorted(group | {module}))
            seen.update(groups[-1])
    return groups


def shortest_loop(graph: grimp.ImportGraph, group: list[str]) -> list[str]:
    """A shortest cycle through the group's first module: `[a, b, a]`."""
    first = group[0]
    back = [graph.find_shortest_chain(importer=m, imported=first) for m in graph.find_modules_directly_imported_by(first)]
    return [first, *min((chain for chain in back if chain is not None), key=len)]


def described(graph: grimp.ImportGraph, group: list[str]) -> str:
    """`a -> b (line 3 of a) -> a (line 5 of b)`, each edge with the lines that make it, then the
    group's other modules."""
    loop = shortest_loop(graph, group)
    steps = [loop[0]]
    for importer, imported in pairwise(loop):
        lines = sorted(d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported))
        steps.append(f"{imported} (line {', '.join(map(str, lines))} of {importer})")
    others = [m for m in group if m not in loop]
    return " -> ".join(steps) + (f"; also in this tangle: {', '.join(others)}" if others else "")


def test_the_projects_modules_import_each_other_without_a_cycle() -> None:
    graph = grimp.build_graph(*root_packages(), exclude_type_checking_imports=True, cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(described(graph, group) for group in cycles)


def test_a_cycle_is_found_and_shown_as_its_shortest_loop() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.b", "p.a"), ("p.c", "p.d"), ("p.e", "p.d")]:
        graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert shortest_loop(graph, ["p.a", "p.b", "p.c"]) == ["p.a", "p.b", "p.a"]
