"""Test-only fault hooks, kept out of the shipped surface.

Nothing here does anything in production. A hook works only when testing is **enabled** in
the process that would commit the fault:

* in the test process itself, loading the pytest plugin (``metal_guard.pytest_plugin``,
  registered as a ``pytest11`` entry point) enables it;
* in a process started as a subprocess — an isolated worker, an ``mlx_lm.server`` started by
  a test — ``METALGUARD_TESTING=1`` must be in that process's environment as well as the
  fault variable itself (``METALGUARD_WORKER_TEST_FAULTS=1``,
  ``METALGUARD_TEST_SERVER_OOM_EVERY=N``). A stray fault variable alone does nothing.

Hooks:

* :func:`inject_worker_fault` — make a runner's worker commit a fault (abort, segfault, a
  huge allocation, a bad frame, ...; see :mod:`metal_guard.isolation.faults`);
* the ``_debug_token_delay_sec=`` keyword of ``MLXSubprocessRunner.generate`` — a pause after
  each token in the worker (a slow stream), honoured only when testing is enabled here;
* :func:`worker_fault_env` — the environment a runner's worker needs for both;
* :func:`server_oom_every` — the server adapters' simulated Metal OOM on every N-th request.

``docs/testing.md`` describes them. Importing this module does no I/O and imports no MLX.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from metal_guard.isolation.runner import MLXSubprocessRunner
    from metal_guard.settings import Settings

__all__ = [
    "TESTING_ENV",
    "TOKEN_DELAY_KEY",
    "TestingDisabled",
    "enabled",
    "inject_worker_fault",
    "server_oom_every",
    "worker_fault_env",
    "worker_faults_enabled",
]

#: The variable that lets a subprocess honour test faults.
TESTING_ENV = "METALGUARD_TESTING"
#: The generate() keyword that slows a worker's token stream (testing only).
TOKEN_DELAY_KEY = "_debug_token_delay_sec"


class TestingDisabled(RuntimeError):
    """A test-only hook was used where testing is not enabled."""

    __test__ = False  # not a test class, whatever pytest's collection rules say


def _plugin_enabled() -> bool:
    plugin = sys.modules.get("metal_guard.pytest_plugin")
    return bool(getattr(plugin, "TESTING_ENABLED", False))


def enabled(settings: Settings | None = None) -> bool:
    """Whether test hooks work in this process: the pytest plugin is active here, or
    ``METALGUARD_TESTING=1`` is set (``settings``: the settings to judge, default current)."""
    if _plugin_enabled():
        return True
    if settings is None:
        from metal_guard.settings import get_settings

        settings = get_settings()
    return bool(settings.testing)


def worker_faults_enabled(settings: Settings) -> bool:
    """In an isolated worker: honour ``_debug_fault`` requests (both variables set)."""
    return bool(settings.worker_test_faults) and enabled(settings)


def server_oom_every(settings: Settings) -> int:
    """The server adapters' simulated-OOM period (0 = off); 0 unless testing is enabled."""
    every = int(settings.test_server_oom_every or 0)
    return every if every and enabled(settings) else 0


def worker_fault_env() -> dict[str, str]:
    """The ``env=`` for an ``MLXSubprocessRunner`` whose worker must honour test faults."""
    return {TESTING_ENV: "1", "METALGUARD_WORKER_TEST_FAULTS": "1"}


def _require() -> None:
    if not enabled():
        raise TestingDisabled(
            "metal_guard.testing hooks are for tests: load the pytest plugin "
            f"(metal_guard.pytest_plugin) or set {TESTING_ENV}=1")


def token_delay(sampling: dict[str, Any]) -> float | None:
    """Pop the test-only token delay from a runner's sampling keywords.

    Outside testing the keyword is left in place, so the request is refused as an unknown
    sampling argument instead of being silently ignored.
    """
    if TOKEN_DELAY_KEY not in sampling or not enabled():
        return None
    value = sampling.pop(TOKEN_DELAY_KEY)
    return float(value) if value else None


def _send_fault(runner: MLXSubprocessRunner, kind: str, *, timeout: float | None = None,
                **params: Any) -> dict[str, Any]:
    from metal_guard.isolation import protocol as P

    req = P.frame(P.DEBUG_FAULT, kind=kind, **params)
    wait = timeout or runner.generate_timeout
    with contextlib.closing(runner._exchange(req, wait, None)) as frames:
        for _ in frames:
            pass
    return dict(runner.last_result or {})


def inject_worker_fault(runner: MLXSubprocessRunner, kind: str, *, timeout: float | None = None,
                        **params: Any) -> dict[str, Any]:
    """Make ``runner``'s worker commit the fault ``kind`` and return the request's result.

    The worker must have been started with :func:`worker_fault_env` in its ``env``; it
    refuses otherwise (a ``WorkerError``). A fault that kills the worker raises what a real
    one would (``SubprocessCrashError``, ``MetalOOMError`` ...).
    """
    _require()
    return _send_fault(runner, kind, timeout=timeout, **params)
