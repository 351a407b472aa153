"""L5: one stoppable scheduler thread running independent jobs.

:class:`Scheduler` owns a single daemon thread and a table of named jobs (periodic flush,
memory watchdog, KV-cache monitor). Starting a job twice replaces it; stopping one leaves the
others running; the thread exits when the last job is removed. ``stop()`` wakes the thread at
once — also out of a job's cool-down sleep, which goes through :meth:`Scheduler.sleep` — so it
returns promptly even mid-tick, and a later start never runs two threads. Every job reads time
through the scheduler's injectable clock, so tests drive ticks with :meth:`run_pending` instead
of sleeping.

Without MLX (or before anything imported it) the jobs stay quiet: an unknown limit is logged
once at DEBUG, never as a warning per tick.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metal_guard import backend
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.settings import Settings, get_settings
from metal_guard.threads import clearing_streams

log = logging.getLogger("metal_guard.watchdog")

__all__ = ["KVMonitorJob", "MemoryWatchJob", "PeriodicFlushJob", "Scheduler", "WatchContext", "Watchdog"]

Clock = Callable[[], float]
GB = 1e9
#: Upper bound on one idle wait of the scheduler thread (it is woken earlier by any change).
MAX_IDLE_WAIT_SEC = 60.0



def call_flexible(callback: Callable[..., Any], *args: Any) -> Any:
    """Call ``callback(*args)`` if its signature accepts them, else ``callback()``."""
    try:
        inspect.signature(callback).bind(*args)
    except TypeError:
        return callback()
    except ValueError:  # no signature (some builtins): try with the arguments
        pass
    return callback(*args)


@dataclass
class _Job:
    name: str
    interval: float
    fn: Callable[[], Any]
    next_due: float
    runs: int = 0
    errors: int = 0


class Scheduler:
    """One daemon thread, many named periodic jobs."""

    def __init__(self, *, clock: Clock = time.monotonic, name: str = "metal-guard-watchdog") -> None:
        self.clock = clock
        self.name = name
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._stale: list[threading.Thread] = []

    # -- jobs
    def add(self, name: str, interval: float, fn: Callable[[], Any], *, first_in: float | None = None) -> None:
        if not interval or interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        with self._cond:
            delay = interval if first_in is None else max(0.0, first_in)
            self._jobs[name] = _Job(name, float(interval), fn, self.clock() + delay)
            self._cond.notify_all()

    def remove(self, name: str) -> bool:
        with self._cond:
            found = self._jobs.pop(name, None) is not None
            self._cond.notify_all()
            return found

    def job_names(self) -> list[str]:
        with self._cond:
            return sorted(self._jobs)

    def job_info(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            now = self.clock()
            return {j.name: {"interval_sec": j.interval, "runs": j.runs, "errors": j.errors,
                             "due_in_sec": round(j.next_due - now, 3)} for j in self._jobs.values()}

    def run_pending(self, now: float | None = None, *, stop: threading.Event | None = None) -> list[str]:
        """Run every job that is due at ``now`` (default: the clock) in the calling thread;
        stop early once ``stop`` is set."""
        with self._cond:
            now = self.clock() if now is None else now
            due = sorted((j for j in self._jobs.values() if j.next_due <= now), key=lambda j: j.next_due)
        ran = []
        for job in due:
            if stop is not None and stop.is_set():
                break
            with self._cond:
                if self._jobs.get(job.name) is not job:
                    continue  # removed or replaced meanwhile
                job.next_due = now + job.interval
            try:
                job.fn()
            except Exception:
                job.errors += 1
                log.exception("watchdog job %s failed", job.name)
            job.runs += 1
            ran.append(job.name)
        return ran

    # -- thread
    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> bool:
        """Start the thread if it is not running; returns whether it started one now."""
        with self._cond:
            if self.running:
                return False
            for old in self._stale:  # a previous thread interrupted mid-job: let it finish
                old.join(5.0)
            self._stale = [t for t in self._stale if t.is_alive()]
            self._stop_event = threading.Event()
            self._thread = threading.Thread(target=clearing_streams(self._loop), args=(self._stop_event,),
                                            name=self.name, daemon=True)
            self._thread.start()
            return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread (jobs stay registered); True when it has exited."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._stop_event.set()
            self._cond.notify_all()
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            self._stale.append(thread)
            return False
        return True

    def sleep(self, seconds: float) -> bool:
        """Cool-down sleep for jobs: returns early (True) when the scheduler is stopped."""
        if seconds <= 0:
            return False
        return self._stop_event.wait(seconds)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                if stop.is_set():
                    break
                if not self._jobs:
                    wait = MAX_IDLE_WAIT_SEC
                else:
                    wait = min(j.next_due for j in self._jobs.values()) - self.clock()
                if wait > 0:
                    self._cond.wait(min(wait, MAX_IDLE_WAIT_SEC))
                    continue
            self.run_pending(stop=stop)


# --------------------------------------------------------------------------- jobs


@dataclass
class WatchContext:
    """What the jobs need from the guard (injectable for tests)."""

    stats: Callable[[], Any]
    gpu_threads_alive: Callable[[], int]
    flush: Callable[[], Any]
    cleanup: Callable[[], Any]
    settings: Callable[[], Settings] = get_settings


@dataclass
class _JobBase:
    ctx: WatchContext
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))

    def _record(self, **event: Any) -> dict[str, Any]:
        event.setdefault("at", time.time())
        self.history.append(event)
        return event


@dataclass
class PeriodicFlushJob(_JobBase):
    """Release the MLX buffer cache when it holds something and no GPU thread is running."""

    def __call__(self) -> dict[str, Any] | None:
        if backend.loaded_core() is None:
            return None  # nothing to flush; stay quiet
        if self.ctx.gpu_threads_alive():
            return self._record(action="skipped_busy")
        stats = self.ctx.stats()
        if not stats.cache_bytes:
            return self._record(action="nothing_cached")
        if not self.ctx.settings().is_defensive:
            _crumb("OBSERVE", "periodic flush would clear the MLX cache", cache_bytes=stats.cache_bytes)
            return self._record(action="observed", cache_bytes=stats.cache_bytes)
        self.ctx.flush()
        return self._record(action="flushed", cache_bytes=stats.cache_bytes)


@dataclass
class MemoryWatchJob(_JobBase):
    """Warn / critical escalation on used memory (MLX active or footprint) vs. the limit, and
    on the kernel's pressure level. warn → flush; critical → ``on_critical`` (zero args or the
    :class:`MemoryStats`), then ``safe_cleanup``. Cleanup is skipped while a registered GPU
    thread runs."""

    warn_pct: float = 70.0
    critical_pct: float = 85.0
    on_critical: Callable[..., Any] | None = None
    level: str = "unknown"
    baseline_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.warn_pct <= self.critical_pct:
            raise ValueError(f"need 0 < warn_pct <= critical_pct, got {self.warn_pct}/{self.critical_pct}")

    def _level(self, stats: Any) -> str:
        pct = stats.used_pct
        if stats.pressure == "critical" or (pct is not None and pct >= self.critical_pct):
            return "critical"
        if stats.pressure == "warn" or (pct is not None and pct >= self.warn_pct):
            return "warn"
        return "ok" if pct is not None else "unknown"

    def __call__(self) -> dict[str, Any] | None:
        stats = self.ctx.stats()
        level = self._level(stats)
        previous, self.level = self.level, level
        if level == "unknown":
            if previous != "unknown":
                log.debug("memory watchdog: limit unknown; not judging")
            return None
        if self.baseline_bytes is None:
            self.baseline_bytes = stats.used_bytes
        pct = stats.used_pct
        if level != previous:
            logger = log.warning if level in ("warn", "critical") else log.info
            logger("memory watchdog: %s -> %s (%s)", previous, level, stats.describe())
            _crumb("WATCHDOG", level.upper(), used_pct=f"{pct or 0:.1f}", pressure=stats.pressure)
        if level == "ok":
            return None
        if level == "critical" and self.on_critical is not None:
            try:  # first, so the application can shed load before we clean up
                call_flexible(self.on_critical, stats)
            except Exception:
                log.exception("on_critical callback failed")
        defensive = self.ctx.settings().is_defensive
        busy = self.ctx.gpu_threads_alive() > 0
        if not defensive:
            action = "observed"
            _crumb("OBSERVE", f"watchdog {level}: would {'clean up' if level == 'critical' else 'flush'}")
        elif busy:
            action = "skipped_busy"
        elif level == "critical":
            self.ctx.cleanup()
            self.baseline_bytes = None
            action = "cleanup"
        else:
            self.ctx.flush()
            action = "flush"
        return self._record(level=level, action=action, used_pct=pct, pressure=stats.pressure)


@dataclass
class KVMonitorJob(_JobBase):
    """MLX active-memory growth over a sliding window, and headroom. Calls
    ``on_pressure(available_gb, growth_rate_gb_per_min)`` on every tick under pressure."""

    headroom_gb: float = 4.0
    growth_rate_warn_gb_per_min: float = 1.0
    on_pressure: Callable[..., Any] | None = None
    window_sec: float = 300.0
    min_span_sec: float = 6.0
    clock: Clock = time.monotonic
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    under_pressure: bool = False

    def growth_rate_gb_per_min(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        return None if span < self.min_span_sec else (b1 - b0) / GB / (span / 60.0)

    def __call__(self) -> dict[str, Any] | None:
        stats = self.ctx.stats()
        if stats.active_bytes is None:
            return None  # MLX not loaded: nothing to monitor, nothing to say
        now = self.clock()
        self.samples.append((now, int(stats.active_bytes)))
        while self.samples and self.samples[0][0] < now - self.window_sec:
            self.samples.popleft()
        rate = self.growth_rate_gb_per_min()
        available = stats.available_gb
        low = available is not None and available < self.headroom_gb
        fast = rate is not None and rate > self.growth_rate_warn_gb_per_min
        pressure = low or fast
        if pressure != self.under_pressure:
            self.under_pressure = pressure
            if pressure:
                log.warning("KV monitor: pressure (available %s GB, growth %s GB/min)",
                            "unknown" if available is None else f"{available:.2f}",
                            "unknown" if rate is None else f"{rate:.2f}")
                _crumb("KV_PRESSURE", "START", low_headroom=low, fast_growth=fast)
            else:
                log.info("KV monitor: pressure cleared")
        if pressure and self.on_pressure is not None:
            try:
                self.on_pressure(available, rate)
            except Exception:
                log.exception("on_pressure callback failed")
        return self._record(pressure=pressure, available_gb=available, growth_rate_gb_per_min=rate)


# --------------------------------------------------------------------------- facade


class Watchdog:
    """The three L5 jobs on one :class:`Scheduler`. Defaults come from the hardware tier
    (``recommended_config()``) and the process mode (``apply_mode_defaults()``)."""

    FLUSH, WATCHDOG, KV = "periodic_flush", "memory_watchdog", "kv_cache_monitor"

    def __init__(self, ctx: WatchContext, *, clock: Clock = time.monotonic) -> None:
        self.ctx = ctx
        self.scheduler = Scheduler(clock=clock)
        self.jobs: dict[str, Any] = {}

    def _start(self, name: str, interval: float, job: Any) -> Any:
        self.jobs[name] = job
        self.scheduler.add(name, interval, job)
        self.scheduler.start()
        return job

    def _stop(self, name: str) -> bool:
        self.jobs.pop(name, None)
        found = self.scheduler.remove(name)
        if not self.scheduler.job_names():
            self.scheduler.stop()
        return found

    def start_periodic_flush(self, interval_secs: float | None = None) -> PeriodicFlushJob:
        from metal_guard.mode import mode_default

        interval = float(mode_default("periodic_flush_interval_sec", interval_secs))
        return self._start(self.FLUSH, interval, PeriodicFlushJob(self.ctx))  # type: ignore[no-any-return]

    def stop_periodic_flush(self) -> bool:
        return self._stop(self.FLUSH)

    def start_watchdog(self, interval_secs: float | None = None, warn_pct: float | None = None,
                       critical_pct: float | None = None,
                       on_critical: Callable[..., Any] | None = None) -> MemoryWatchJob:
        from metal_guard.hardware import recommended_config
        from metal_guard.mode import mode_default

        cfg = recommended_config() if warn_pct is None or critical_pct is None else {}
        job = MemoryWatchJob(
            self.ctx,
            warn_pct=float(warn_pct if warn_pct is not None else cfg["watchdog_warn_pct"]),
            critical_pct=float(critical_pct if critical_pct is not None else cfg["watchdog_critical_pct"]),
            on_critical=on_critical)
        interval = float(mode_default("periodic_flush_interval_sec", interval_secs))
        return self._start(self.WATCHDOG, interval, job)  # type: ignore[no-any-return]

    def stop_watchdog(self) -> bool:
        return self._stop(self.WATCHDOG)

    def start_kv_cache_monitor(
        self, interval_secs: float = 30.0, growth_rate_warn_gb_per_min: float | None = None,
        headroom_gb: float | None = None, on_pressure: Callable[..., Any] | None = None, *,
        window_secs: float = 300.0, growth_rate_warn: float | None = None,
    ) -> KVMonitorJob:
        from metal_guard.hardware import recommended_config

        rate = growth_rate_warn_gb_per_min if growth_rate_warn_gb_per_min is not None else growth_rate_warn
        cfg = recommended_config() if rate is None or headroom_gb is None else {}
        job = KVMonitorJob(
            self.ctx,
            headroom_gb=float(headroom_gb if headroom_gb is not None else cfg["kv_headroom_gb"]),
            growth_rate_warn_gb_per_min=float(rate if rate is not None else cfg["kv_growth_rate_warn"]),
            on_pressure=on_pressure, window_sec=float(window_secs), clock=self.scheduler.clock)
        return self._start(self.KV, float(interval_secs), job)  # type: ignore[no-any-return]

    def stop_kv_cache_monitor(self) -> bool:
        return self._stop(self.KV)

    def stop_all(self, timeout: float = 5.0) -> bool:
        for name in list(self.jobs):
            self.jobs.pop(name, None)
            self.scheduler.remove(name)
        return self.scheduler.stop(timeout)

    def status(self) -> dict[str, Any]:
        return {"running": self.scheduler.running, "jobs": self.scheduler.job_info()}
