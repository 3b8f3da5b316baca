"""The layout the README's module map describes, held by tests: no import cycle among the
project's modules (lazy imports counted), the gateway imports nothing of the worker's (what
both use is in ``common/``), ``common/`` imports neither, and no module is over 500 lines; in
the suite, only a test marked ``extras`` may skip."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "gateway", "worker")
#: Lines a module may have; past it a module is doing more than one thing.
MAX_MODULE_LINES = 500


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (every import statement, also inside
    functions; a package's ``__init__`` is not counted as an import of its own children)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for imported in targets:
                target = imported
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_import_cycle() -> None:
    assert cycles(imports()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_gateway_imports_nothing_of_the_worker_and_common_neither() -> None:
    graph = imports()
    crossing = {
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if (m.startswith("gateway") and t.startswith("worker"))
        or (m.startswith("common") and not t.startswith("common"))
    }
    assert crossing == set()


def test_no_module_is_over_500_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_a_skip_fails_unless_the_test_is_marked_extras() -> None:
    """The suite's report hook (``tests/conftest.py``): a skipped test fails unless it is
    marked ``extras``; its own items are FAKES (a marker lookup), its reports pytest's own."""
    from tests.conftest import pytest_runtest_makereport

    class Item:
        def __init__(self, marked: bool):
            self.marked = marked

        def get_closest_marker(self, name: str) -> object | None:
            return object() if self.marked and name == "extras" else None

    def report_of(marked: bool, outcome: str, xfail: bool = False) -> pytest.TestReport:
        made = pytest.TestReport(
            "t.py::t", ("t.py", 0, "t"), {}, outcome, ("t.py", 1, "Skipped: torch"), "call"
        )
        if xfail:
            made.wasxfail = "known"  # type: ignore[attr-defined]
        hook = pytest_runtest_makereport(Item(marked), None)  # type: ignore[arg-type]
        next(hook)  # type: ignore[call-overload]
        with pytest.raises(StopIteration) as ended:
            hook.send(made)  # type: ignore[attr-defined]
        report: pytest.TestReport = ended.value.value
        return report

    assert report_of(marked=True, outcome="skipped").outcome == "skipped"
    failed = report_of(marked=False, outcome="skipped")
    assert failed.outcome == "failed" and "not marked extras" in str(failed.longrepr)
    assert report_of(marked=False, outcome="passed").outcome == "passed"
    assert report_of(marked=False, outcome="skipped", xfail=True).outcome == "skipped"
