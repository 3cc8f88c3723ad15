"""pytest plugin for ``make gpu-check``'s pytest row (``-p benchmarks.gpu_check_pytest``).

A bare GPU image lacks some optional packages (starlette, uvicorn, httpx, tensorrt, ...). A test module
that cannot be imported because one of them is missing is reported as skipped, with the package's name
as the reason, instead of a collection error that fails the whole row. A module that fails for any
other reason (a missing project module, a syntax error, a failing import-time assert) still errors.
"""

from __future__ import annotations

import pytest

# Top-level names that are this project's own: missing one of those is a real error, never a skip.
PROJECT = frozenset({"ferret_runtime", "ferret_train", "ferret_export", "tests", "benchmarks"})


def missing_package(exc: BaseException | None) -> str | None:
    """The optional top-level package whose absence raised ``exc`` (following its causes), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            return None if top in PROJECT else top
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    call = getattr(report, "call", None)  # set by pytest's own implementation
    if not (report.failed and isinstance(collector, pytest.Module) and call is not None and call.excinfo):
        return
    name = missing_package(call.excinfo.value)
    if name:
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), None, f"Skipped: needs {name}, which is not installed here")
