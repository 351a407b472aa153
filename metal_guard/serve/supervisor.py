"""Which child serves, and when a new one may start.

One thread (:meth:`Supervisor.run`) owns every decision and every process start (on Linux the
children's parent-death signal is tied to that thread, so it lives until the children are
stopped). It reacts to events posted by the children's threads:

* ``ready`` — the candidate becomes the active child (or the idle standby);
* ``died`` — classified like an L7 worker death (:class:`~metal_guard.errors.SubprocessCrashError`,
  an error class from :mod:`metal_guard.classify`) and counted by the circuit breaker; the
  standby, if ready, takes over at once; otherwise a new child starts after backoff;
* ``not_ready`` — a start that failed (no ``/health`` in time, warm-up refused): the child is
  stopped and the start counts as failed.

Before every start: the panic gate and the breaker (:func:`~metal_guard.isolation.supervisor.check_spawn_allowed`;
observer mode only logs), the cadence (a start waits until the same-model interval has
passed; the child's adapter records the load) and the backoff. A breaker that refuses ends the
front with :data:`~metal_guard.cli.EXIT_SERVE_BREAKER`; an active panic cooldown with
:data:`~metal_guard.cli.EXIT_COOLDOWN`; :attr:`max_start_failures` starts in a row that never
became ready with :data:`~metal_guard.cli.EXIT_FAILED`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metal_guard.serve.child import Child, free_port
from metal_guard.serve.command import ServerCommand
from metal_guard.serve.logsink import LogSink

log = logging.getLogger("metal_guard.serve.supervisor")

__all__ = ["ServeOptions", "Supervisor"]

#: A child that stayed up this long resets the backoff.
STABLE_SEC = 60.0


@dataclass
class ServeOptions:
    standby: bool = False
    ready_timeout_sec: float = 600.0
    stop_grace_sec: float = 10.0
    max_start_failures: int = 5
    backoff_base_sec: float = 0.5
    backoff_max_sec: float = 30.0
    warmup: bool = True
    watch: str = "auto"
    env: dict[str, str] = field(default_factory=dict)


class Supervisor:
    """The pair's state machine. ``on_exit(code)`` is called once when the front must end."""

    def __init__(self, command: ServerCommand, options: ServeOptions, sink: LogSink,
                 on_exit: Callable[[int], None]) -> None:
        self.command = command
        self.options = options
        self.sink = sink
        self.on_exit = on_exit
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._lock = threading.Lock()
        self.active: Child | None = None
        self.standby: Child | None = None
        self.candidate: Child | None = None  # the child starting to become active
        self.state = "starting"
        self.reason: str | None = "starting the server"
        self.exit_code: int | None = None
        self.started_at = time.monotonic()
        self.next_start_at = 0.0
        self.next_standby_at = 0.0
        self.failures = 0  # consecutive crashes/failed starts (backoff)
        self.start_failures = 0  # starts in a row that never became ready
        self.restarts = 0
        self.crashes = 0
        self.switches = 0
        self.last_crash: dict[str, Any] | None = None
        self.last_time_to_ready_sec: float | None = None
        self._numbers = 0
        self._stopping = False
        self._thread = threading.Thread(target=self.run, name="metal-guard-serve-supervisor",
                                        daemon=True)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the children and the supervisor thread (idempotent, blocks until done)."""
        self._stopping = True
        self.events.put(("stop",))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def route(self) -> tuple[Child | None, str, float]:
        """The child to forward to, else ``None`` with the state, and a Retry-After guess."""
        with self._lock:
            child = self.active
            if child is not None and child.alive() and self.state == "ready":
                return child, "ready", 0.0
            return None, self.state, self._retry_after()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            def info(c: Child | None) -> dict[str, Any] | None:
                if c is None:
                    return None
                return {"pid": c.pid, "port": c.port, "number": c.number,
                        "ready": c.ready.is_set(), "time_to_ready_sec": c.time_to_ready_sec}
            return {
                "state": self.state,
                "reason": self.reason,
                "child_up": self.active is not None and self.active.alive() and self.state == "ready",
                "active": info(self.active),
                "standby": info(self.standby),
                "starting": info(self.candidate),
                "standby_enabled": self.options.standby,
                "restarts": self.restarts,
                "crashes": self.crashes,
                "standby_switches": self.switches,
                "last_crash": dict(self.last_crash) if self.last_crash else None,
                "time_to_ready_sec": self.last_time_to_ready_sec,
                "retry_after_sec": None if self.state == "ready" else self._retry_after(),
                "uptime_sec": round(time.monotonic() - self.started_at, 3),
                "exit_code": self.exit_code,
            }

    # ------------------------------------------------------------------ helpers

    def _retry_after(self) -> float:
        wait = max(0.0, self.next_start_at - time.monotonic())
        return wait + (self.last_time_to_ready_sec or 1.0)

    def _set(self, state: str, reason: str | None) -> None:
        with self._lock:
            self.state, self.reason = state, reason

    def _new_child(self, role: str) -> Child:
        self._numbers += 1
        port = free_port()
        child = Child(self._numbers, self.command.child_argv(port), port, env=self.options.env,
                      sink=self.sink, events=self.events, model_id=self.command.model_id,
                      warmup=self.options.warmup and self.command.model is not None,
                      ready_timeout=self.options.ready_timeout_sec, watch=self.options.watch)
        child.role = role
        return child

    def _finish(self, code: int, reason: str) -> None:
        if self.exit_code is not None:
            return
        log.error("metal-guard serve: %s; exiting with code %d", reason, code)
        self.exit_code = code
        self._stopping = True
        self._set("down", reason)
        with contextlib.suppress(Exception):
            self.on_exit(code)

    def _admission(self) -> float | None:
        """Seconds to wait before a start (cadence), ``None`` when the front must exit."""
        from metal_guard.cli import EXIT_COOLDOWN, EXIT_SERVE_BREAKER
        from metal_guard.errors import MLXCooldownActive, PanicCooldownActive
        from metal_guard.isolation.supervisor import check_spawn_allowed

        model = self.command.model_id
        try:
            check_spawn_allowed(model)
        except PanicCooldownActive as exc:
            self._finish(EXIT_COOLDOWN, f"panic cooldown active: {exc}")
            return None
        except MLXCooldownActive as exc:
            self._finish(EXIT_SERVE_BREAKER, f"circuit breaker open: {exc}")
            return None
        return _cadence_wait(model)

    def _try_start(self, role: str) -> None:
        """Start an active (or standby) child if admission allows it now."""
        wait = self._admission()
        if wait is None:
            return
        now = time.monotonic()
        if wait > 0:
            if role == "active":
                self.next_start_at = max(self.next_start_at, now + wait)
                self._set("starting", f"waiting {wait:.1f}s for the load cadence")
            else:
                self.next_standby_at = max(self.next_standby_at, now + wait)
            return
        child = self._new_child(role)
        try:
            child.start()
        except OSError as exc:
            self._failed_start(child, f"cannot start the server: {exc}")
            return
        log.info("started %s child #%d (pid %s, port %d)", role, child.number, child.pid, child.port)
        if role == "active":
            self.candidate = child
            self._set("starting", f"starting child #{child.number} (pid {child.pid})")
        else:
            self.standby = child

    def _failed_start(self, child: Child, reason: str) -> None:
        from metal_guard.cli import EXIT_FAILED

        self.failures += 1
        self.start_failures += 1
        delay = _backoff(self.failures, self.options)
        if child.role == "active":
            self.candidate = None
            self.next_start_at = time.monotonic() + delay
            self._set("starting", f"{reason}; retrying in {delay:.1f}s")
        else:
            self.standby = None
            self.next_standby_at = time.monotonic() + delay
        if self.start_failures >= self.options.max_start_failures:
            self._finish(EXIT_FAILED, f"{self.start_failures} server starts in a row failed "
                                      f"(last: {reason})")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("metal-guard serve: supervisor failed")
            from metal_guard.cli import EXIT_INTERNAL

            self._finish(EXIT_INTERNAL, "internal error in the supervisor")
        finally:
            self._stop_children()

    def _loop(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            if self.active is None and self.candidate is None:
                if self.standby is not None:
                    self._promote_standby(self.standby.ready.is_set())
                elif now >= self.next_start_at:
                    self._try_start("active")
            if (self.options.standby and self.standby is None and self.active is not None
                    and self.candidate is None and not self._stopping
                    and time.monotonic() >= self.next_standby_at):
                self._try_start("standby")
            timeout = 0.5
            for at in (self.next_start_at, self.next_standby_at):
                if at > now:
                    timeout = min(timeout, max(0.01, at - now))
            try:
                event = self.events.get(timeout=timeout)
            except queue.Empty:
                continue
            self._handle(event)

    def _promote_standby(self, ready: bool) -> None:
        child = self.standby
        assert child is not None
        self.standby = None
        child.role = "active"
        if ready:
            with self._lock:
                self.active = child
                self.state, self.reason = "ready", None
            self.switches += 1
            self.next_standby_at = time.monotonic() + _backoff(self.failures, self.options)
            log.warning("switched to the standby child #%d (pid %s)", child.number, child.pid)
        else:
            self.candidate = child
            self._set("starting", f"standby child #{child.number} is still loading")

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "stop":
            return
        child: Child = event[1]
        if kind == "ready":
            self._on_ready(child)
        elif kind == "died":
            self._on_died(child)
        elif kind == "not_ready" and child in (self.candidate, self.standby):
            log.warning("child #%d did not become ready: %s", child.number, event[2])
            child.stop(self.options.stop_grace_sec)
            self._failed_start(child, str(event[2]))

    def _on_ready(self, child: Child) -> None:
        self.start_failures = 0
        if child is self.candidate:
            self.candidate = None
            with self._lock:
                self.active = child
                self.state, self.reason = "ready", None
            self.last_time_to_ready_sec = child.time_to_ready_sec
            log.info("child #%d ready in %.2fs (pid %s)", child.number,
                     child.time_to_ready_sec or 0.0, child.pid)
        elif child is self.standby:
            log.info("standby child #%d ready in %.2fs (pid %s)", child.number,
                     child.time_to_ready_sec or 0.0, child.pid)

    def _on_died(self, child: Child) -> None:
        if child.stopping:
            child.reap_threads()
            return
        err = child.classify()
        cls = err.error_class
        self.crashes += 1
        uptime = (time.monotonic() - child.ready_at) if child.ready_at else 0.0
        self.failures = 1 if uptime >= STABLE_SEC else self.failures + 1
        with self._lock:
            self.last_crash = {
                "child": child.number, "pid": child.pid, "role": child.role,
                "exitcode": child.exitcode, "signal": err.signal,
                "error_class": cls.name if cls else None,
                "recovery_hint": err.recovery_hint, "message": str(err)[:500],
                "at": time.time(),
            }
        log.warning("%s", err)
        _record(err, child)
        was_active = child is self.active
        if not child.ready.is_set():
            self.start_failures += 1
        if was_active:
            with self._lock:
                self.active = None
                self.state = "starting"
                self.reason = f"the server died ({cls.name if cls else err.signal or 'exit'}); restarting"
            self.restarts += 1
            self.next_start_at = time.monotonic() + _backoff(self.failures, self.options)
            if self.standby is not None and self.standby.ready.is_set():
                self._promote_standby(True)
        elif child is self.candidate:
            self.candidate = None
            self.next_start_at = time.monotonic() + _backoff(self.failures, self.options)
            self._set("starting", f"the starting server died ({cls.name if cls else 'exit'}); retrying")
        elif child is self.standby:
            self.standby = None
            self.next_standby_at = time.monotonic() + _backoff(self.failures, self.options)
        child.reap_threads()
        from metal_guard.cli import EXIT_FAILED

        if self.start_failures >= self.options.max_start_failures:
            self._finish(EXIT_FAILED, f"{self.start_failures} server starts in a row failed "
                                      f"(last: {err})")
            return
        self._admission_after_crash()

    def _admission_after_crash(self) -> None:
        """A crash may have opened the breaker: end the front now rather than at the next start."""
        from metal_guard.cli import EXIT_COOLDOWN, EXIT_SERVE_BREAKER
        from metal_guard.errors import MLXCooldownActive, PanicCooldownActive
        from metal_guard.isolation.supervisor import check_spawn_allowed

        try:
            check_spawn_allowed(self.command.model_id)
        except PanicCooldownActive as exc:
            self._finish(EXIT_COOLDOWN, f"panic cooldown active: {exc}")
        except MLXCooldownActive as exc:
            self._finish(EXIT_SERVE_BREAKER, f"circuit breaker open: {exc}")

    def _stop_children(self) -> None:
        for child in (self.candidate, self.standby, self.active):
            if child is not None:
                with contextlib.suppress(Exception):
                    child.stop(self.options.stop_grace_sec)
        with self._lock:
            self.active = self.standby = self.candidate = None
            if self.state != "down":
                self.state, self.reason = "down", "stopped"


def _backoff(failures: int, options: ServeOptions) -> float:
    from metal_guard.isolation.supervisor import backoff_delay

    return backoff_delay(failures, base_sec=options.backoff_base_sec, max_sec=options.backoff_max_sec)


def _cadence_wait(model_id: str) -> float:
    """Seconds until a load of ``model_id`` is allowed by the cadence (0 when off or clear)."""
    from metal_guard.settings import get_settings

    settings = get_settings()
    if not (settings.cadence and settings.is_defensive):
        return 0.0
    try:
        from metal_guard.cadence import CadenceGuard

        guard = CadenceGuard(min_interval_sec=settings.cadence_min_interval_sec,
                             cross_model_interval_sec=settings.cross_model_interval_sec)
        return float(guard.seconds_until_clear(model_id))
    except Exception as exc:
        log.warning("cadence check failed (%s); starting anyway", exc)
        return 0.0


def _record(err: Any, child: Child) -> None:
    from metal_guard.breadcrumbs import breadcrumb_with_meta
    from metal_guard.isolation.supervisor import record_crash

    cls = err.error_class
    breadcrumb_with_meta("SERVE_CHILD_CRASH", child.model_id, pid=child.pid,
                         exitcode=child.exitcode, signal=err.signal,
                         error_class=cls.name if cls else None, role=child.role)
    record_crash(err, pid=child.pid)
