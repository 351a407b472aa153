"""The worker lifecycle behind :class:`~metal_guard.isolation.runner.MLXSubprocessRunner`.

:class:`WorkerLifecycle` holds everything between "a request wants a worker" and "that
worker is gone": reading frames with a no-progress deadline, turning a death into
:class:`SubprocessCrashError` and a stall into :class:`SubprocessTimeoutError`, (re)spawning
after backoff and memory recovery when breaker and gate allow it, the footprint monitor's
callbacks, retiring untrusted workers and the L8 GPU lock. It also keeps the registry of
live runners that ``shutdown_all_workers`` walks at exit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metal_guard.errors import SubprocessCrashError, SubprocessTimeoutError, WorkerError
from metal_guard.isolation import protocol as P
from metal_guard.isolation import supervisor as S
from metal_guard.isolation.spawn import (
    WorkerHandle,
    crash_detail,
    map_worker_error,
    process_alive,
    read_log_tail,
    start_worker,
)

if TYPE_CHECKING:  # pragma: no cover
    from metal_guard.isolation.runner import MLXSubprocessRunner

log = logging.getLogger("metal_guard.isolation.runner")

__all__ = ["WorkerLifecycle", "live_runners"]

POLL_SEC = 0.25
#: How long a stalled worker gets to write its stack dump (SIGUSR1) before SIGKILL.
STACK_DUMP_SEC = 0.25

_RUNNERS: weakref.WeakSet[MLXSubprocessRunner] = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _channel_open(chan: P.Channel) -> bool:
    """False when the worker's end of the socket is closed (it died, maybe not yet reaped).

    An idle worker sends nothing, so anything readable is either EOF or a stale frame of an
    abandoned request (dropped here).
    """
    try:
        while chan.poll(0):
            chan.recv()
    except (EOFError, OSError, P.ProtocolError):
        return False
    return True


def crumb(tag: str, payload: str, **meta: Any) -> None:
    from metal_guard.breadcrumbs import breadcrumb_with_meta

    breadcrumb_with_meta(tag, payload, **meta)


class WorkerLifecycle:
    """Mixin of :class:`MLXSubprocessRunner`: one worker at a time, replaced when it fails."""

    model_id: str
    backend: str
    load_timeout: float
    heartbeat_interval_sec: float
    footprint_interval_sec: float
    backoff_base_sec: float
    backoff_max_sec: float
    memory_recovery_timeout_sec: float
    env: dict[str, str]
    load_kwargs: dict[str, Any]
    crash_count: int
    respawn_count: int
    _handle: WorkerHandle
    _state: threading.RLock
    _request_owner: int | None
    _closed: bool
    _spawned: bool
    _failures: int
    _last_failure_at: float | None
    _baseline_available: int | None
    _stop_reason: str | None
    _lock_path: str | None
    _default_limit: int | None
    _clock: Callable[[], float]
    _sleep: Callable[[float], None]

    @property
    def max_footprint_bytes(self) -> int | None:  # pragma: no cover - defined by the runner
        raise NotImplementedError

    def _next_frame(self, proc: Any, chan: P.Channel, wait: float, *, phase: str,
                    timeout: float, message: str | None = None) -> dict[str, Any]:
        """The next frame, or a typed error: crash, no progress for ``wait`` s, bad frame.

        ``message`` replaces the timeout error's text (e.g. for the prefill bound).
        """
        deadline = self._clock() + wait
        while True:
            remaining = deadline - self._clock()
            # Poll before judging the deadline: a parent descheduled past it (a loaded box)
            # must still take the frame already in the socket buffer, not kill a healthy
            # worker. Past the deadline this is one non-blocking look, then the timeout.
            try:
                if chan.poll(min(max(remaining, 0.0), POLL_SEC)):
                    return chan.recv()
            except (EOFError, OSError):
                raise self._on_death(proc, phase) from None
            except P.ProtocolError:
                self._retire(proc)
                raise
            if remaining <= 0:
                raise self._on_timeout(proc, phase, timeout, message)
            if not process_alive(proc):
                with contextlib.suppress(EOFError, OSError, P.ProtocolError):
                    if chan.poll(0):
                        return chan.recv()  # last words sent just before exiting
                raise self._on_death(proc, phase)

    # ------------------------------------------------------------------ failures

    def _worker_error(self, proc: Any, fr: dict[str, Any]) -> BaseException:
        if self._closed and fr.get("exc_type") == "GenerationStopped":
            return WorkerError(f"the runner for {self.model_id!r} was shut down during "
                               "generate", exc_type="Shutdown")
        err = map_worker_error(self.model_id, fr, stop_reason=self._stop_reason,
                               pid=proc.pid)
        cls = getattr(err, "error_class", None)
        if cls is not None and cls.severity in ("fatal", "critical"):
            log.warning("worker for %r reported %s (%s); replacing it", self.model_id, cls.name,
                        cls.severity)
            self._retire(proc)
        return err

    def _on_death(self, proc: Any, phase: str) -> BaseException:
        exitcode = WorkerHandle.wait_exit(proc)
        if self._closed:
            self._discard_if_idle(proc)
            return WorkerError(f"the runner for {self.model_id!r} was shut down during {phase}",
                               exc_type="Shutdown")
        handle = self._handle
        detail = crash_detail(handle)
        cls = None
        if handle.kill_reason is not None:  # our own footprint enforcement: a memory kill
            with contextlib.suppress(Exception):
                from metal_guard.classify import get_error_class

                cls = get_error_class("worker_killed")
        err = SubprocessCrashError(self.model_id, exitcode, detail, error_class=cls)
        extra: Any = err
        extra.phase = phase
        extra.worker_pid = proc.pid
        extra.log_path = str(handle.log_path) if handle.log_path else None
        self.crash_count += 1
        self._note_failure(proc, phase, "crashed", exitcode=exitcode, signal=err.signal,
                           error_class=err.error_class.name if err.error_class else None)
        if handle.kill_reason is None:
            S.record_crash(err, pid=proc.pid)
        log.warning("%s", err)
        return err

    def _on_timeout(self, proc: Any, phase: str, timeout: float,
                    message: str | None = None) -> BaseException:
        with contextlib.suppress(OSError):  # ask faulthandler for every thread's stack first
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(STACK_DUMP_SEC)
        WorkerHandle.stop_process(proc, grace_sec=0.0)
        err: Any = SubprocessTimeoutError(self.model_id, timeout, phase)
        if message:
            err.args = (message,)
        err.worker_pid = proc.pid
        err.detail = read_log_tail(self._handle.log_path)
        lines = err.detail.strip().splitlines()
        if lines:
            err.add_note("worker log at the timeout:\n" + "\n".join(lines[-40:]))
        self._note_failure(proc, phase, "timeout", timeout_sec=timeout)
        # A stalled generation or prefill may be a GPU hang; a slow load, a request the worker
        # would not take, or a prompt too long for the prefill bound is not.
        if phase in ("generate", "prefill") and not message:
            S.record_crash(err, pid=proc.pid)
        log.warning("%s", err)
        return err

    def _note_failure(self, proc: Any, phase: str, outcome: str, **meta: Any) -> None:
        self._failures += 1
        self._last_failure_at = self._clock()
        if self._handle.in_generation and phase in ("generate", "tokenize", "prefill", "send"):
            crumb("SUBPROC_POST", self.model_id, pid=proc.pid, outcome=outcome)
        crumb("SUBPROC_CRASH" if outcome == "crashed" else "SUBPROC_TIMEOUT", self.model_id,
               pid=proc.pid, phase=phase, **meta)
        self._discard(proc, keep_log=True)

    # ------------------------------------------------------------------ worker lifecycle

    def _ensure_worker(self) -> tuple[Any, P.Channel]:
        with self._state:
            if self._closed:
                raise RuntimeError(f"the runner for {self.model_id!r} has been shut down")
            proc, chan = self._handle.proc, self._handle.chan
            if proc is not None and chan is not None and process_alive(proc) \
                    and _channel_open(chan):
                return proc, chan
            if proc is not None:
                err = self._on_death(proc, "idle")
                log.warning("respawning after the worker died while idle: %s", err)
            self._spawn()
            assert self._handle.proc is not None and self._handle.chan is not None
            return self._handle.proc, self._handle.chan

    def _spawn(self) -> None:
        S.check_spawn_allowed(self.model_id)
        self._wait_before_respawn()
        if self._baseline_available is None:
            self._baseline_available = S.system_available_bytes()
        if self._spawned:
            self.respawn_count += 1
        self._spawned = True
        start_worker(self, self._handle)
        ready = self._await_ready()
        self._default_limit = None  # re-derive the default limit with the worker's device facts
        crumb("SUBPROCESS_WORKER", f"{self.model_id} ready", pid=ready["pid"],
               create_time=f"{float(ready.get('create_time') or 0.0):.3f}",
               backend=self.backend, load_sec=ready.get("load_sec"),
               respawn=self.respawn_count)
        proc = self._handle.proc
        assert proc is not None
        self._handle.monitor = _monitor_for(self, proc).start()

    def _await_ready(self) -> dict[str, Any]:
        proc, chan = self._handle.proc, self._handle.chan
        assert proc is not None and chan is not None
        deadline = self._clock() + self.load_timeout
        while True:
            remaining = max(0.0, deadline - self._clock())
            fr = self._next_frame(proc, chan, remaining, phase="load", timeout=self.load_timeout)
            if fr["type"] == P.READY:
                self._handle.ready = {k: v for k, v in fr.items() if k not in ("v", "type")}
                return self._handle.ready
            if fr["type"] == P.ERROR:
                self._failures += 1
                self._last_failure_at = self._clock()
                WorkerHandle.wait_exit(proc)
                self._discard(proc, keep_log=True)
                raise map_worker_error(self.model_id, fr, stop_reason=None, pid=proc.pid)

    def _wait_before_respawn(self) -> None:
        if not self._failures or self._last_failure_at is None:
            return
        delay = S.backoff_delay(self._failures, base_sec=self.backoff_base_sec,
                                max_sec=self.backoff_max_sec)
        remaining = self._last_failure_at + delay - self._clock()
        if remaining > 0:
            log.info("respawning the worker for %r in %.2fs (failure %d)", self.model_id,
                     remaining, self._failures)
            self._sleep(remaining)
        total = None
        with contextlib.suppress(Exception):
            import psutil

            total = int(psutil.virtual_memory().total)
        tolerance = max(512 << 20, int(0.05 * total)) if total else 512 << 20
        if not S.wait_for_memory_recovery(self._baseline_available,
                                          timeout_sec=self.memory_recovery_timeout_sec,
                                          tolerance_bytes=tolerance, clock=self._clock,
                                          sleep=self._sleep):
            log.warning("system memory has not returned to its pre-load level within %.0fs; "
                        "respawning the worker for %r anyway", self.memory_recovery_timeout_sec,
                        self.model_id)
            crumb("SUBPROC_MEMORY_WAIT", self.model_id, outcome="timeout")

    def _request_stop(self, reason: str) -> None:
        """Ask the worker to end the request in progress (nothing to stop when idle)."""
        rid, chan = self._handle.current_id, self._handle.chan
        if rid is None or chan is None:
            return
        self._stop_reason = reason
        with contextlib.suppress(OSError, ValueError):
            chan.send(P.frame(P.STOP, id=rid, reason=reason), timeout=2.0)

    def _on_breach(self, reason: str, action: str) -> None:
        if action != "stop":
            self._handle.kill_reason = f"killed by metal-guard ({action}): {reason}"
        pid = self._handle.proc.pid if self._handle.proc else None
        log.warning("worker for %r (pid %s): %s; action: %s", self.model_id, pid, reason, action)
        crumb("SUBPROC_FOOTPRINT", self.model_id, pid=pid, action=action,
               limit_bytes=self.max_footprint_bytes)

    def _retire(self, proc: Any) -> None:
        """Replace a worker that is alive but no longer trusted (not a crash)."""
        WorkerHandle.stop_process(proc, grace_sec=2.0, chan=self._handle.chan)
        self._discard(proc, keep_log=False)

    def _discard(self, proc: Any, *, keep_log: bool) -> None:
        with self._state:
            if self._handle.proc is proc:
                self._handle.discard(keep_log=keep_log)

    def _discard_if_idle(self, proc: Any) -> None:
        """Close the channel unless a request thread is still reading from it."""
        if proc is None or self._request_owner is not None:
            return
        self._discard(proc, keep_log=proc.returncode not in (0, None))

    # ------------------------------------------------------------------ GPU lock

    def _acquire_gpu_lock(self) -> None:
        from metal_guard._policy_steps import _guard_layer
        from metal_guard.settings import get_settings

        # A lock layer that cannot be imported: GuardLayerError (defensive) or a warning.
        lock = _guard_layer("metal_guard.lock", get_settings())
        if lock is None:
            return
        info = lock.acquire_mlx_lock(f"mlx_subprocess_runner:{self.model_id}")
        if info.acquired:
            self._lock_path = info.lock_path or None
            if self._lock_path is not None:
                # A runner dropped without shutdown() must not hold the GPU lock until exit.
                self._lock_finalizer = weakref.finalize(self, _release_lock_at, self._lock_path)

    def _release_gpu_lock(self) -> None:
        path, self._lock_path = self._lock_path, None
        finalizer = getattr(self, "_lock_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        if path is not None:
            _release_lock_at(path)


def _release_lock_at(path: str) -> None:
    try:
        from metal_guard.lock import release_mlx_lock

        release_mlx_lock(lock_path=Path(path))
    except Exception as exc:
        log.warning("could not release the MLX lock: %s", exc)


def _monitor_for(runner: WorkerLifecycle, proc: Any) -> S.FootprintMonitor:
    """A footprint monitor that refers to the runner weakly (so an abandoned runner can still
    be garbage-collected and its finalizer kill the worker)."""
    ref = weakref.ref(runner)

    def limit() -> int | None:
        r = ref()
        return r.max_footprint_bytes if r is not None else None

    def request_stop(reason: str) -> None:
        r = ref()
        if r is not None:
            r._request_stop(reason)

    def on_breach(reason: str, action: str) -> None:
        r = ref()
        if r is not None:
            r._on_breach(reason, action)

    return S.FootprintMonitor(proc.pid, limit=limit, is_alive=lambda: process_alive(proc),
                              request_stop=request_stop, on_breach=on_breach,
                              interval_sec=runner.footprint_interval_sec)


# ---------------------------------------------------------------------------- registry


def register(runner: MLXSubprocessRunner) -> None:
    """Track ``runner`` for ``shutdown_all_workers`` (registered with ``atexit`` once)."""
    global _ATEXIT_REGISTERED
    with _REGISTRY_LOCK:
        _RUNNERS.add(runner)
        if not _ATEXIT_REGISTERED:
            import atexit

            from metal_guard.isolation.pool import shutdown_all_workers

            atexit.register(shutdown_all_workers)
            _ATEXIT_REGISTERED = True


def unregister(runner: MLXSubprocessRunner) -> None:
    with _REGISTRY_LOCK:
        _RUNNERS.discard(runner)


def live_runners() -> list[MLXSubprocessRunner]:
    """Every runner of this process that has not been shut down."""
    with _REGISTRY_LOCK:
        return [r for r in _RUNNERS if not r.closed]
