"""pytest plugin (entry point ``pytest11: metal_guard``), loaded automatically once metal-guard
is installed.

* ``metal_guard_installed`` — a fixture that runs :func:`metal_guard.install` for one test and
  uninstalls afterwards; yields the adapter report. Options come from the ``metal_guard``
  marker: ``@pytest.mark.metal_guard(adapters=["mlx_lm"], cadence=False)``.
* the leak check — after every test, if metal-guard is installed now but was not installed
  when the test started, the test errors ("left metal-guard installed") and metal-guard is
  uninstalled so the next test starts clean. ``metal_guard_leak_check = fail | warn | off`` in
  the ini file (or ``--metal-guard-leak-check``) changes that.

* test hooks — loading the plugin enables :mod:`metal_guard.testing` in the test process
  (:data:`TESTING_ENABLED`). A subprocess a test starts (an isolated worker, a server) honours
  fault variables only with ``METALGUARD_TESTING=1`` in its own environment.

Loading the plugin imports nothing but pytest: ``metal_guard.install`` is looked up in
``sys.modules`` and imported only by the fixture.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from metal_guard.install_report import InstallReport

_CHOICES = ("fail", "warn", "off")
#: Read by :func:`metal_guard.testing.enabled`: set while the plugin is configured.
TESTING_ENABLED = False


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("metal-guard")
    group.addoption("--metal-guard-leak-check", choices=_CHOICES, default=None,
                    help="what to do when a test leaves metal-guard installed (default: fail)")
    parser.addini("metal_guard_leak_check", "fail | warn | off (default: fail)", default="fail")


def pytest_configure(config: pytest.Config) -> None:
    global TESTING_ENABLED
    TESTING_ENABLED = True
    config.addinivalue_line(
        "markers", "metal_guard(**options): options for the metal_guard_installed fixture "
        "(install() keywords, e.g. adapters=['mlx_lm'], cadence=False)")


def _installed() -> bool:
    module = sys.modules.get("metal_guard.installer")
    return bool(module is not None and module.is_installed())


@pytest.fixture
def metal_guard_installed(request: pytest.FixtureRequest) -> Iterator[InstallReport]:
    """metal-guard installed for this test (``@pytest.mark.metal_guard(**options)``)."""
    from metal_guard import installer as mg

    if mg.is_installed():
        pytest.fail("metal-guard is already installed; the metal_guard_installed fixture needs a "
                    "clean start (another fixture or test left it installed)")
    marker = request.node.get_closest_marker("metal_guard")
    options = dict(marker.kwargs) if marker is not None else {}
    report = mg.install(**options)
    try:
        yield report
    finally:
        mg.uninstall()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_before_key] = _installed()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    result = yield  # fixtures (including metal_guard_installed) are finalised first
    _leak_check(item)
    return result


def _leak_check(item: pytest.Item) -> None:
    mode = item.config.getoption("--metal-guard-leak-check") or item.config.getini("metal_guard_leak_check")
    if mode == "off" or item.stash.get(_before_key, True) or not _installed():
        return
    from metal_guard import installer as mg

    sites = [site for ad in mg.adapter_report().adapters.values() for site in ad.sites]
    mg.uninstall()
    message = (f"{item.nodeid} left metal-guard installed ({len(sites)} wrapped site(s)); "
               "call metal_guard.uninstall() or use the metal_guard_installed fixture")
    if mode == "warn":
        warnings.warn(message, pytest.PytestWarning, stacklevel=1)
    else:
        pytest.fail(message, pytrace=False)


_before_key = pytest.StashKey[bool]()


def pytest_unconfigure(config: pytest.Config) -> None:
    global TESTING_ENABLED
    TESTING_ENABLED = False
