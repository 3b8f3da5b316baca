"""What the end-to-end tests report beside their pass or fail: :data:`FAULT_REPORTS`, printed
at the end of the run ("figures of the fault, fuzz and batch tests"), and the check that every
process the tests started is gone when the session ends (both hooks, imported by
``tests/conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from devstack import localstack as ls

#: Lines fault tests report (requests sent, lost, ...): printed at the end of the run.
FAULT_REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULT_REPORTS:
        terminalreporter.section("figures of the fault, fuzz and batch tests")
        for line in FAULT_REPORTS:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every process the tests started must be gone when the session ends (their fixtures stop
    them, also after a failure). Anything left is killed, named, and fails the run."""
    import psutil

    left = [f"{p.popen.args!r} (pid {p.pid})" for p in ls.leftovers()]
    for p in ls.leftovers():
        p.stop(timeout=5)
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing.resource_tracker" in cmd:
            continue  # Python's own helper, ends with this process
        left.append(f"{cmd[:200]} (pid {child.pid})")
        child.kill()
    if left:
        print(
            "\nprocesses still running at the end of the session (killed now):\n  "
            + "\n  ".join(left)
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if vllm_imported_by_the_fast_layer(session):
        print("\nthe fast layer (tests/unit) imported vLLM: it must run without it")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def vllm_imported_by_the_fast_layer(session: pytest.Session) -> bool:
    """True when every test of the session is in ``tests/unit`` and vLLM was imported: the
    fast layer runs with the ``test`` extra alone (``pip install -e '.[test]'``)."""
    import sys
    from pathlib import Path

    unit = Path(__file__).resolve().parents[1] / "unit"
    items = getattr(session, "items", [])
    only_unit = bool(items) and all(
        unit in Path(str(item.fspath)).resolve().parents for item in items
    )
    return only_unit and "vllm" in sys.modules
