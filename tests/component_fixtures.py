"""The real components in the tests (a plugin of tests/conftest.py): `require(name)` gives a
component's program, and a missing component FAILS the test that needs it, naming it, unless the run
opts out with COTMON_TEST_WITHOUT (then the test skips). The run ends with the versions of the
components it used and the ones that did not run.

The list of components and how they are installed live in tests/components.py.
"""

from __future__ import annotations

from importlib import metadata

import pytest

from components import COMPONENTS, OPT_OUT, opted_out

_used: set[str] = set()
_not_run: dict[str, str] = {}
"""Component -> why it did not run (missing, opted out)."""
PYTHON_PACKAGES = ("torch", "transformers", "playwright", "psycopg")


def require(name: str, binary: str | None = None) -> str:
    """The path of `binary` (default: the component's first) of component `name`.

    Missing: the test fails naming it, or skips where COTMON_TEST_WITHOUT names it (or is `all`).
    """
    component = COMPONENTS[name]
    missing = component.missing()
    if missing:
        why = f"{name} is missing ({', '.join(missing)}); {component.needed_by} need it"
        if name in opted_out():
            _not_run[name] = f"missing: {', '.join(missing)}"
            pytest.skip(f"{why}; {OPT_OUT} lets this run go without it")
        pytest.fail(
            f"{why}. `make test` installs it (make components); to run without it knowingly, set {OPT_OUT}={name}",
            pytrace=False,
        )
    _used.add(name)
    path = component.path(binary)
    assert path is not None
    return path


def pytest_configure(config: pytest.Config) -> None:
    try:
        opted_out()
    except SystemExit as exc:  # an unknown name: say so before any test runs
        raise pytest.UsageError(str(exc)) from None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write = terminalreporter.write_line
    if _used:
        terminalreporter.section("real components used")
        for name in sorted(_used):
            write(f"{name:13} {COMPONENTS[name].version()}")
        for package in PYTHON_PACKAGES:
            try:
                write(f"{package:13} {metadata.version(package)} (Python package)")
            except metadata.PackageNotFoundError:
                write(f"{package:13} not installed (Python package)")
    if _not_run:
        terminalreporter.section(f"real components that did NOT run ({OPT_OUT})", yellow=True)
        for name, why in sorted(_not_run.items()):
            write(f"{name:13} {why}; its tests were skipped: {COMPONENTS[name].needed_by}")
