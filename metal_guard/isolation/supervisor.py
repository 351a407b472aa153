"""Parent-side policy for isolated workers: admission, backoff, memory recovery, footprint.

* :func:`check_spawn_allowed` — the L9 circuit breaker and the L10 panic gate must both say
  "proceed" before a worker is (re)started (observer mode logs instead of refusing).
* :func:`record_crash` — a worker death that points at the GPU counts toward the breaker.
* :func:`backoff_delay` — exponential respawn backoff.
* :func:`wait_for_memory_recovery` — after a crash, wait (bounded) until the system's available
  memory is back near what it was before the first load.
* :class:`FootprintMonitor` — a thread that samples the worker's footprint from *outside*
  and, above the hard limit, asks the worker to stop, then SIGTERMs, then SIGKILLs its
  process group.

Breaker, gate and footprint readers come from their own modules and are imported lazily; a
breaker or gate that cannot be imported is a ``GuardLayerError`` (defensive) or a warning
(observer), never a silent skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from metal_guard.threads import clearing_streams

log = logging.getLogger("metal_guard.isolation.supervisor")

__all__ = [
    "FootprintMonitor",
    "backoff_delay",
    "check_spawn_allowed",
    "default_footprint_limit",
    "process_tree_footprint_bytes",
    "record_crash",
    "signal_group",
    "system_available_bytes",
    "wait_for_memory_recovery",
]

#: Crash classes that are our own doing or not the GPU's: not breaker events.
_NOT_GPU_KINDS = frozenset({"process_exit"})


def check_spawn_allowed(model_id: str) -> None:
    """Raise ``MLXCooldownActive`` / ``PanicCooldownActive`` when a worker must not start.

    The breaker and the gate are safety layers: one that cannot be imported (a broken
    install) raises :class:`~metal_guard.errors.GuardLayerError` in defensive mode and is a
    warning on every spawn in observer mode — never a silent skip.
    """
    from metal_guard._policy_steps import _guard_layer
    from metal_guard.errors import MLXCooldownActive, PanicCooldownActive
    from metal_guard.settings import get_settings

    settings = get_settings()
    observer = not settings.is_defensive
    breaker = _guard_layer("metal_guard.breaker", settings)
    if breaker is not None:
        try:
            breaker.CircuitBreaker().check()
        except MLXCooldownActive as exc:
            if not observer:
                raise
            log.warning("observer mode: starting a worker for %r despite: %s", model_id, exc)
    gate = _guard_layer("metal_guard.forensics.gate", settings)
    if gate is None:
        return
    verdict = gate.evaluate_panic_cooldown()
    if verdict.proceed:
        return
    if getattr(verdict, "state", "") == "broken":
        log.warning("panic gate is broken (%s); starting the worker anyway", verdict.reason)
        return
    if observer:
        log.warning("observer mode: starting a worker for %r despite: %s", model_id, verdict.reason)
        return
    raise PanicCooldownActive(verdict)


def record_crash(error: Any, *, pid: int | None) -> None:
    """Count a worker crash toward the circuit breaker (never raises: the crash is being
    reported already). A breaker that cannot be imported is a warning and a ``GUARD_BROKEN``
    breadcrumb, every time: the crash goes uncounted, and the user must know."""
    cls = getattr(error, "error_class", None)
    if cls is not None and cls.kind in _NOT_GPU_KINDS:
        return
    try:
        from metal_guard.breaker import CircuitBreaker
    except Exception as exc:  # ImportError, or a module that fails while it executes
        from metal_guard.breadcrumbs import breadcrumb_with_meta

        breadcrumb_with_meta("GUARD_BROKEN", "metal_guard.breaker", error=type(exc).__name__)
        log.warning("metal-guard safety layer metal_guard.breaker cannot be imported (%s); this "
                    "worker crash is not counted toward the circuit breaker. The installation "
                    "is broken: reinstall metal-guard.", f"{type(exc).__name__}: {exc}"[:300])
        return
    try:
        kind = f"worker_crash:{cls.name}" if cls is not None else "worker_crash"
        CircuitBreaker(auto_ingest=False).record_failure(kind, str(error), pid=pid)
    except Exception as exc:
        log.warning("could not record the crash with the circuit breaker: %s", exc)


def backoff_delay(consecutive_failures: int, *, base_sec: float = 0.25,
                  max_sec: float = 30.0) -> float:
    """Seconds to wait before respawn number ``consecutive_failures`` (0 → no wait).

    1 → ``base``, 2 → ``2·base``, 3 → ``4·base`` ... capped at ``max_sec``.
    """
    if consecutive_failures <= 0 or base_sec <= 0:
        return 0.0
    return float(min(max_sec, base_sec * (2.0 ** min(consecutive_failures - 1, 30))))


def system_available_bytes() -> int | None:
    """Machine-wide available memory (bytes), or ``None`` when unreadable."""
    try:
        from metal_guard.hardware import system_memory

        return system_memory().available_bytes
    except ImportError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def wait_for_memory_recovery(
    baseline_bytes: int | None,
    *,
    timeout_sec: float,
    tolerance_bytes: int,
    read: Callable[[], int | None] = system_available_bytes,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_sec: float = 0.1,
) -> bool:
    """Wait until available memory ≥ ``baseline - tolerance``; True if it got there in time.

    With no baseline (unreadable memory) there is nothing to wait for: True at once.
    """
    if baseline_bytes is None:
        return True
    target = baseline_bytes - tolerance_bytes
    deadline = clock() + max(0.0, timeout_sec)
    while True:
        available = read()
        if available is None or available >= target:
            return True
        if clock() >= deadline:
            return False
        sleep(poll_sec)


def process_tree_footprint_bytes(pid: int) -> int | None:
    """Footprint of ``pid`` plus its descendants (bytes); ``None`` when ``pid`` is unreadable.

    Uses the macOS ``ri_phys_footprint`` (Metal buffers included) where available, else RSS.
    """
    read: Callable[[int], int | None]
    try:
        from metal_guard.hardware import process_footprint_bytes as read
    except ImportError:
        read = _rss
    total = read(pid)
    if total is None:
        return None
    try:
        import psutil

        for child in psutil.Process(pid).children(recursive=True):
            part = read(child.pid)
            total += part or 0
    except Exception:
        pass
    return total


def _rss(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


def default_footprint_limit(ready: dict[str, Any] | None = None) -> int | None:
    """The hard limit when none is configured: the GPU's recommended working set (from the
    worker or the hardware probe) and the tier's critical share of RAM, whichever is lower."""
    candidates: list[int] = []
    rec = (ready or {}).get("recommended_working_set_bytes")
    if isinstance(rec, int) and rec > 0:
        candidates.append(rec)
    try:
        from metal_guard.hardware import recommended_config

        cfg = recommended_config()
        total = cfg.get("memory_total_bytes")
        pct = cfg.get("watchdog_critical_pct")
        if isinstance(total, int) and total > 0 and isinstance(pct, (int, float)) and pct > 0:
            candidates.append(int(total * float(pct) / 100.0))
        hw_rec = cfg.get("recommended_working_set_bytes")
        if isinstance(hw_rec, int) and hw_rec > 0:
            candidates.append(hw_rec)
    except Exception as exc:
        log.debug("recommended_config unavailable: %s", exc)
    return min(candidates) if candidates else None


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid`` (or just ``pid``); never to our own group.

    Returns False when the process is already gone.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    except OSError:
        pgid = -1
    try:
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class FootprintMonitor:
    """Sample a worker's footprint every ``interval_sec``; enforce ``limit()`` from outside.

    A breach needs ``breaches`` consecutive samples above the limit; an unreadable sample
    never counts. Enforcement: ``on_breach(reason)``, then ``request_stop(reason)`` (the
    worker ends its current request and frees its cache), ``grace_sec`` to get under the
    limit, then SIGTERM to the process group, ``grace_sec``, then SIGKILL.
    """

    def __init__(
        self,
        pid: int,
        *,
        limit: Callable[[], int | None],
        is_alive: Callable[[], bool],
        request_stop: Callable[[str], None],
        on_breach: Callable[[str, str], None],
        interval_sec: float = 0.5,
        breaches: int = 2,
        grace_sec: float = 1.0,
        sample: Callable[[int], int | None] = process_tree_footprint_bytes,
    ) -> None:
        self.pid = pid
        self._limit = limit
        self._is_alive = is_alive
        self._request_stop = request_stop
        self._on_breach = on_breach
        self.interval_sec = interval_sec
        self.breaches_needed = max(1, breaches)
        self.grace_sec = grace_sec
        self._sample = sample
        self.last_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=clearing_streams(self._run), daemon=True,
                                        name=f"metal-guard-footprint-{pid}")

    def start(self) -> FootprintMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def sample(self) -> int | None:
        value = self._sample(self.pid)
        if value is not None:
            self.last_bytes = value
            self.peak_bytes = value if self.peak_bytes is None else max(self.peak_bytes, value)
        return value

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(self.interval_sec):
            if not self._is_alive():
                return
            value = self.sample()
            limit = self._limit()
            if value is None or not limit:
                continue  # unusable samples and "no limit" never count
            count = count + 1 if value > limit else 0
            if count >= self.breaches_needed:
                count = 0
                with contextlib.suppress(Exception):
                    self._enforce(value, limit)

    def _wait_under(self, limit: int) -> bool:
        deadline = time.monotonic() + self.grace_sec
        while time.monotonic() < deadline:
            if not self._is_alive():
                return True
            value = self.sample()
            if value is not None and value <= limit:
                return True
            if self._stop.wait(0.05):
                return True
        return not self._is_alive()

    def _enforce(self, value: int, limit: int) -> None:
        reason = (f"worker footprint {value / 1e9:.3f} GB exceeded the hard limit "
                  f"{limit / 1e9:.3f} GB")
        self._on_breach(reason, "stop")
        self._request_stop(reason)
        if self._wait_under(limit):
            return
        self._on_breach(reason, "sigterm")
        signal_group(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_sec
        while self._is_alive() and time.monotonic() < deadline:
            if self._stop.wait(0.05):
                break
        if self._is_alive():
            self._on_breach(reason, "sigkill")
            signal_group(self.pid, signal.SIGKILL)
