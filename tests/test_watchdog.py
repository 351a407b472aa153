"""watchdog.py: one scheduler thread; jobs driven by an injected clock; real start/stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from metal_guard.hardware import recommended_config
from metal_guard.instance import MetalGuard
from metal_guard.memory import MemoryStats
from metal_guard.watchdog import (
    KVMonitorJob,
    MemoryWatchJob,
    PeriodicFlushJob,
    Scheduler,
    WatchContext,
    call_flexible,
)

GB = 10**9


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Ctx:
    """A WatchContext whose inputs the test sets and whose actions it counts."""

    def __init__(self) -> None:
        self.stats_value = MemoryStats(active_bytes=10 * GB, peak_bytes=10 * GB, limit_bytes=100 * GB)
        self.busy = 0
        self.flushes = 0
        self.cleanups = 0

    def context(self) -> WatchContext:
        return WatchContext(stats=lambda: self.stats_value, gpu_threads_alive=lambda: self.busy,
                            flush=self._flush, cleanup=self._cleanup)

    def _flush(self) -> None:
        self.flushes += 1

    def _cleanup(self) -> None:
        self.cleanups += 1

    def set_pct(self, pct: float, **kw: Any) -> None:
        self.stats_value = MemoryStats(active_bytes=int(pct * GB), peak_bytes=int(pct * GB),
                                       limit_bytes=100 * GB, **kw)


def watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "metal-guard-watchdog" and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    assert watchdog_threads() == []


# --------------------------------------------------------------------------- scheduler


def test_scheduler_runs_due_jobs_by_the_injected_clock() -> None:
    clock = FakeClock()
    sched = Scheduler(clock=clock)
    ran: list[str] = []
    sched.add("a", 10, lambda: ran.append("a"))
    sched.add("b", 30, lambda: ran.append("b"))
    assert sched.run_pending() == []
    clock.advance(10)
    assert sched.run_pending() == ["a"]
    clock.advance(20)
    assert sorted(sched.run_pending()) == ["a", "b"]
    sched.remove("a")
    clock.advance(30)
    assert sched.run_pending() == ["b"] and ran.count("a") == 2


def test_scheduler_replaces_jobs_and_survives_errors(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    sched = Scheduler(clock=clock)
    sched.add("x", 5, lambda: 1 / 0)
    sched.add("x", 5, lambda: 1 / 0)
    assert sched.job_names() == ["x"]
    clock.advance(5)
    with caplog.at_level(logging.ERROR, logger="metal_guard.watchdog"):
        assert sched.run_pending() == ["x"]
    assert sched.job_info()["x"]["errors"] == 1
    with pytest.raises(ValueError):
        sched.add("bad", 0, lambda: None)


def test_start_stop_restart_leaves_no_thread() -> None:
    sched = Scheduler()
    sched.add("noop", 3600, lambda: None)
    assert sched.start() is True and sched.start() is False
    assert len(watchdog_threads()) == 1
    assert sched.stop() is True and watchdog_threads() == []
    assert sched.stop() is True  # idempotent
    sched.start()
    assert len(watchdog_threads()) == 1
    assert sched.stop() is True and watchdog_threads() == []


def test_stop_returns_promptly_mid_tick() -> None:
    sched = Scheduler()
    entered, finished = threading.Event(), threading.Event()

    def slow_job() -> None:  # like safe_cleanup's cool-down inside the watchdog
        entered.set()
        sched.sleep(30)
        finished.set()

    sched.add("slow", 0.01, slow_job, first_in=0)
    sched.start()
    assert entered.wait(5)
    # the job sleeps 30 s: stop() returning True within its 5 s means it cut the sleep short
    assert sched.stop(timeout=5) is True
    assert finished.is_set()
    sched.start()  # restarting after an interrupted tick runs one thread, not two
    assert len(watchdog_threads()) == 1
    sched.remove("slow")
    sched.stop()


def test_thread_runs_jobs_on_real_time() -> None:
    sched = Scheduler()
    hits = threading.Event()
    sched.add("quick", 0.02, hits.set)
    sched.start()
    try:
        assert hits.wait(5)
    finally:
        sched.stop()


# --------------------------------------------------------------------------- memory watchdog


def test_memory_watchdog_escalates(caplog: pytest.LogCaptureFixture) -> None:
    ctx = Ctx()
    seen: list[Any] = []
    job = MemoryWatchJob(ctx.context(), warn_pct=70, critical_pct=85, on_critical=seen.append)
    ctx.set_pct(50)
    assert job() is None and job.level == "ok"
    ctx.set_pct(75)
    assert job()["action"] == "flush" and ctx.flushes == 1
    ctx.set_pct(90)
    with caplog.at_level(logging.WARNING, logger="metal_guard.watchdog"):
        assert job()["action"] == "cleanup"
        assert job()["action"] == "cleanup"
    assert ctx.cleanups == 2 and len(seen) == 2 and isinstance(seen[0], MemoryStats)
    assert len([r for r in caplog.records if "critical" in r.getMessage()]) == 1  # transition only


def test_memory_watchdog_busy_and_observer(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Ctx()
    calls: list[int] = []
    job = MemoryWatchJob(ctx.context(), warn_pct=70, critical_pct=85, on_critical=lambda: calls.append(1))
    ctx.set_pct(95)
    ctx.busy = 1
    assert job()["action"] == "skipped_busy" and ctx.cleanups == 0 and calls == [1]
    ctx.busy = 0
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    assert job()["action"] == "observed" and ctx.cleanups == 0 and calls == [1, 1]


def test_memory_watchdog_kernel_pressure_without_limit() -> None:
    ctx = Ctx()
    job = MemoryWatchJob(ctx.context())
    ctx.stats_value = MemoryStats(pressure="critical")
    assert job()["level"] == "critical" and ctx.cleanups == 1


def test_no_warning_spam_without_mlx(caplog: pytest.LogCaptureFixture) -> None:
    ctx = Ctx()
    ctx.stats_value = MemoryStats(footprint_bytes=5 * GB)  # no MLX: no limit, no active bytes
    clock = FakeClock()
    watch = MemoryWatchJob(ctx.context())
    kv = KVMonitorJob(ctx.context(), on_pressure=lambda a, r: pytest.fail("no pressure without MLX"),
                      clock=clock)
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        for _ in range(50):
            clock.advance(30)
            assert watch() is None and kv() is None
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert ctx.flushes == ctx.cleanups == 0


def test_watchdog_thresholds_are_validated() -> None:
    with pytest.raises(ValueError):
        MemoryWatchJob(Ctx().context(), warn_pct=90, critical_pct=80)


# --------------------------------------------------------------------------- KV monitor


def test_kv_monitor_growth_rate_over_sliding_window() -> None:
    ctx, clock = Ctx(), FakeClock()
    events: list[tuple[float | None, float | None]] = []
    job = KVMonitorJob(ctx.context(), headroom_gb=4.0, growth_rate_warn_gb_per_min=1.0,
                       on_pressure=lambda a, r: events.append((a, r)), window_sec=300, clock=clock)
    ctx.set_pct(10)
    assert job()["growth_rate_gb_per_min"] is None  # one sample
    clock.advance(3)
    ctx.set_pct(10.2)
    assert job()["growth_rate_gb_per_min"] is None  # span < 6 s
    for _ in range(6):  # +0.5 GB every 10 s = 3 GB/min
        clock.advance(10)
        ctx.set_pct(ctx.stats_value.active_bytes / GB + 0.5)
        job()
    assert events and events[-1][1] == pytest.approx(3.0, rel=0.1)
    assert events[-1][0] == pytest.approx(ctx.stats_value.available_gb)
    # growth stops: once the window slides past the climb, the rate drops and pressure clears
    for _ in range(40):
        clock.advance(10)
        job()
    assert job.samples[0][0] >= clock.now - 300
    assert job.growth_rate_gb_per_min() == pytest.approx(0.0) and job.under_pressure is False


def test_kv_monitor_low_headroom() -> None:
    ctx, clock = Ctx(), FakeClock()
    events: list[tuple[float | None, float | None]] = []
    job = KVMonitorJob(ctx.context(), headroom_gb=4.0, on_pressure=lambda a, r: events.append((a, r)), clock=clock)
    ctx.set_pct(97)
    assert job()["pressure"] is True and events == [(pytest.approx(3.0), None)]


def test_periodic_flush_job_on_real_mlx() -> None:
    mx = pytest.importorskip("mlx.core")
    from metal_guard import cleanup, memory

    old = mx.set_cache_limit(1 << 30)
    try:
        a = mx.ones((1 << 20,), dtype=mx.float32)
        mx.eval(a)
        del a
        assert mx.get_cache_memory() > 0
        busy = [1]
        ctx = WatchContext(stats=lambda: memory.memory_stats(load=False), gpu_threads_alive=lambda: busy[0],
                           flush=cleanup.flush_gpu, cleanup=lambda: None)
        job = PeriodicFlushJob(ctx)
        assert job()["action"] == "skipped_busy" and mx.get_cache_memory() > 0
        busy[0] = 0
        assert job()["action"] == "flushed" and mx.get_cache_memory() == 0
        assert job()["action"] == "nothing_cached"
    finally:
        mx.set_cache_limit(old)


def test_call_flexible() -> None:
    assert call_flexible(lambda: "none", 1) == "none"
    assert call_flexible(lambda s: s, 1) == 1
    assert call_flexible(lambda *a: a, 1, 2) == (1, 2)


# --------------------------------------------------------------------------- the guard's jobs


def test_guard_jobs_start_stop_idempotent_and_independent() -> None:
    guard = MetalGuard(cooldown_secs=0.0)
    guard.start_periodic_flush(3600)
    guard.start_periodic_flush(3600)
    guard.start_watchdog(3600)
    guard.start_kv_cache_monitor(3600)
    assert len(watchdog_threads()) == 1
    assert sorted(guard.status()["watchdog"]["jobs"]) == ["kv_cache_monitor", "memory_watchdog", "periodic_flush"]
    assert guard.stop_periodic_flush() is True and guard.stop_periodic_flush() is False
    assert len(watchdog_threads()) == 1  # the others keep running
    guard.stop_watchdog()
    assert len(watchdog_threads()) == 1
    guard.stop_kv_cache_monitor()
    assert watchdog_threads() == []
    guard.start_watchdog(3600)
    assert guard.stop_all() is True and watchdog_threads() == []


def test_guard_defaults_come_from_tier_and_process_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_PROCESS_MODE", "server")
    guard = MetalGuard(cooldown_secs=0.0)
    cfg = recommended_config()
    try:
        wd = guard.start_watchdog()
        kv = guard.start_kv_cache_monitor()
        flush = guard.start_periodic_flush()
        assert isinstance(flush, PeriodicFlushJob)
        assert (wd.warn_pct, wd.critical_pct) == (cfg["watchdog_warn_pct"], cfg["watchdog_critical_pct"])
        assert (kv.headroom_gb, kv.growth_rate_warn_gb_per_min) == (cfg["kv_headroom_gb"], cfg["kv_growth_rate_warn"])
        info = guard.status()["watchdog"]["jobs"]
        assert info["periodic_flush"]["interval_sec"] == 60.0  # server-mode default
        assert info["memory_watchdog"]["interval_sec"] == 60.0
        assert info["kv_cache_monitor"]["interval_sec"] == 30.0
        explicit = guard.start_watchdog(interval_secs=5, warn_pct=10, critical_pct=20)
        assert (explicit.warn_pct, explicit.critical_pct) == (10, 20)
        assert guard.status()["watchdog"]["jobs"]["memory_watchdog"]["interval_sec"] == 5
        alias = guard.start_kv_cache_monitor(growth_rate_warn=7.0)
        assert alias.growth_rate_warn_gb_per_min == 7.0
    finally:
        guard.stop_all()


def test_guard_watchdog_cleanup_is_interruptible() -> None:
    """A critical tick runs safe_cleanup; its cool-down must not hold up stop()."""
    guard = MetalGuard(cooldown_secs=30.0)
    cooling = threading.Event()
    sched = guard.watchdog.scheduler
    real_sleep = sched.sleep

    def sleep(seconds: float) -> bool:
        if seconds >= 30:
            cooling.set()  # safe_cleanup's cool-down has begun
        return real_sleep(seconds)

    sched.sleep = sleep  # type: ignore[method-assign]
    job = guard.start_watchdog(interval_secs=0.01, warn_pct=0.0001, critical_pct=0.0001)
    try:
        job.ctx.stats = lambda: MemoryStats(active_bytes=GB, peak_bytes=GB, limit_bytes=2 * GB)
        assert cooling.wait(30)
        # a 30 s cool-down in progress: stop_all() returning True within 5 s cut it short
        assert guard.stop_all(timeout=5) is True
    finally:
        guard.stop_all()
