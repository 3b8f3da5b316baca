"""The test suite: ``tests/unit`` (the fast layer: no vLLM, no subprocess, seconds) and
``tests/e2e`` (real processes on loopback; every test there is marked ``slow``). Helpers are in
``tests/support``; its session fixtures (:mod:`tests.support.stack`) and report hooks
(:mod:`tests.support.reports`) are made every test's here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.reports import pytest_sessionfinish, pytest_terminal_summary
from tests.support.stack import *  # noqa: F403 - session fixtures

E2E = Path(__file__).resolve().parent / "e2e"

__all__ = ["pytest_sessionfinish", "pytest_terminal_summary"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """A test skips only if marked ``extras`` (it needs what the ``test`` extra leaves out):
    any other skip is a failure, so that the fast layer run with that extra alone (make test's
    first step) runs every test it can."""
    report: pytest.TestReport = yield
    xfailed = hasattr(report, "wasxfail")  # pytest reports an expected failure as skipped
    if report.skipped and not xfailed and item.get_closest_marker("extras") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped, but not marked extras: {report.longrepr}"
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The marker follows the folder: every test under ``tests/e2e`` is ``slow``."""
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
