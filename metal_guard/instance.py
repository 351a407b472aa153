"""The seed's ``MetalGuard`` class and its singleton ``metal_guard``.

A thin object: it owns a thread registry (L1) and, once a job is started, one watchdog
scheduler thread (L5); every method delegates to :mod:`~metal_guard.cleanup`,
:mod:`~metal_guard.oom`, :mod:`~metal_guard.memory`, :mod:`~metal_guard.watchdog` and
:mod:`~metal_guard.hardware`. Constructing it does nothing else — no I/O, no thread, no MLX.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from metal_guard import backend, cleanup, hardware, memory, modelsize, oom
from metal_guard._results import ResultRecord
from metal_guard.watchdog import (
    KVMonitorJob,
    MemoryWatchJob,
    PeriodicFlushJob,
    WatchContext,
    Watchdog,
)

__all__ = ["GuardStatus", "MetalGuard", "metal_guard"]

T = TypeVar("T")
_DEFAULT: Any = object()


@dataclass(frozen=True, eq=False)
class GuardStatus(ResultRecord):
    """:meth:`MetalGuard.status` (``as_dict()`` for JSON; ``status["mode"]`` still works)."""

    mode: str
    registered_threads_alive: int
    #: the L5 scheduler: ``running`` and its ``jobs``
    watchdog: dict[str, Any] = field(default_factory=dict)


class MetalGuard:
    """L1-L5 in one object.

    ``cooldown_secs`` (the sleep at the end of ``safe_cleanup``) defaults to the hardware
    tier's ``cooldown_secs``. ``breadcrumb_path`` only affects :meth:`breadcrumb`: by default
    it writes to the configured breadcrumb log, ``None`` turns this object's breadcrumbs off.
    """

    def __init__(self, cooldown_secs: float | None = None, thread_timeout_secs: float = 30.0,
                 breadcrumb_path: str | Path | None = _DEFAULT) -> None:
        if cooldown_secs is not None and cooldown_secs < 0:
            raise ValueError("cooldown_secs must be >= 0")
        if thread_timeout_secs < 0:
            raise ValueError("thread_timeout_secs must be >= 0")
        self._cooldown_secs = cooldown_secs
        self.thread_timeout_secs = thread_timeout_secs
        self._breadcrumb_path = breadcrumb_path
        self.registry = cleanup.ThreadRegistry()
        self._watchdog: Watchdog | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        running = self._watchdog is not None and self._watchdog.scheduler.running
        return f"<MetalGuard threads={len(self.registry.alive(exclude_current=False))} watchdog={'on' if running else 'off'}>"

    @property
    def cooldown_secs(self) -> float:
        if self._cooldown_secs is not None:
            return self._cooldown_secs
        return float(hardware.recommended_config().get("cooldown_secs", 2.0))

    # ------------------------------------------------------------------ L1 / L2
    def register_thread(self, thread: threading.Thread) -> threading.Thread:
        return self.registry.register(thread)

    def wait_for_threads(self, timeout: float | None = None) -> int:
        return self.registry.wait(self.thread_timeout_secs if timeout is None else timeout)

    def flush_gpu(self) -> bool:
        return cleanup.flush_gpu()

    def safe_cleanup(self, *, sleep: Callable[[float], Any] | None = None, reason: str = "",
                     cooldown_secs: float | None = None) -> cleanup.CleanupResult:
        return cleanup.safe_cleanup(
            self.registry, cooldown_secs=self.cooldown_secs if cooldown_secs is None else cooldown_secs,
            thread_timeout_secs=self.thread_timeout_secs, sleep=sleep or time.sleep, reason=reason)

    def guarded_cleanup(self) -> AbstractContextManager[None]:
        return cleanup.guarded_cleanup(self.safe_cleanup)

    # ------------------------------------------------------------------ L3
    def oom_protected(self, fn: Callable[..., T], *args: Any, max_retries: int = 1,
                      reduce: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
                      **kwargs: Any) -> T:
        return oom.call_with_oom_recovery(fn, args, kwargs, max_retries=max_retries,
                                          reduce=reduce, cleanup=self.safe_cleanup)

    def oom_protected_context(self) -> AbstractContextManager[None]:
        return oom.oom_protected_context(cleanup=self.safe_cleanup)

    @staticmethod
    def is_metal_oom(exc: object) -> bool:
        from metal_guard.classify import is_metal_oom

        return is_metal_oom(exc)

    # ------------------------------------------------------------------ L4
    def check_fit(self, model_size_gb: float | None = None, overhead_gb: float | None = None,
                  **kwargs: Any) -> memory.FitResult:
        return memory.check_fit(model_size_gb, overhead_gb, **kwargs)

    def can_fit(self, model_size_gb: float | None = None, overhead_gb: float | None = None,
                **kwargs: Any) -> bool:
        return memory.can_fit(model_size_gb, overhead_gb, **kwargs)

    def require_fit(self, model_size_gb: float | None = None, model_name: str = "",
                    overhead_gb: float | None = None, **kwargs: Any) -> memory.FitResult:
        kwargs.setdefault("cleanup", self.safe_cleanup)
        return memory.require_fit(model_size_gb, model_name, overhead_gb, **kwargs)

    @staticmethod
    def estimate_model_size_from_name(name: str) -> float | None:
        return modelsize.estimate_model_size_from_name(name)

    @staticmethod
    def estimate_model_size(model: str) -> modelsize.ModelSize:
        return modelsize.estimate_model_size(model)

    # ------------------------------------------------------------------ L5 statistics
    def memory_stats(self, *, load: bool = True) -> memory.MemoryStats:
        return memory.memory_stats(load=load)

    def is_pressure_high(self, threshold_pct: float = 67.0, model_name: str = "") -> bool:
        return memory.is_pressure_high(threshold_pct, model_name)

    def ensure_headroom(self, model_name: str = "", threshold_pct: float = 67.0) -> memory.MemoryStats:
        return memory.ensure_headroom(model_name, threshold_pct, cleanup=self.safe_cleanup)

    def log_memory(self, label: str, model_name: str = "") -> memory.MemoryStats:
        return memory.log_memory(label, model_name)

    def probe_metal_health(self) -> bool:
        """Evaluate a tiny array (between breadcrumbs); ``False`` without MLX."""
        self.breadcrumb("PROBE: START")
        ok = backend.eval_probe()
        self.breadcrumb(f"PROBE: {'OK' if ok else 'NO_MLX'}")
        return ok

    # ------------------------------------------------------------------ L5 jobs
    @property
    def watchdog(self) -> Watchdog:
        with self._lock:
            if self._watchdog is None:
                ctx = WatchContext(
                    stats=lambda: memory.memory_stats(load=False),
                    gpu_threads_alive=lambda: len(self.registry.alive()),
                    flush=cleanup.flush_gpu,
                    cleanup=lambda: self.safe_cleanup(sleep=self.watchdog.scheduler.sleep,
                                                      reason="watchdog"),
                )
                self._watchdog = Watchdog(ctx)
            return self._watchdog

    def start_periodic_flush(self, interval_secs: float | None = None) -> PeriodicFlushJob:
        return self.watchdog.start_periodic_flush(interval_secs)

    def stop_periodic_flush(self) -> bool:
        return self.watchdog.stop_periodic_flush()

    def start_watchdog(self, interval_secs: float | None = None, warn_pct: float | None = None,
                       critical_pct: float | None = None,
                       on_critical: Callable[..., Any] | None = None) -> MemoryWatchJob:
        return self.watchdog.start_watchdog(interval_secs, warn_pct, critical_pct, on_critical)

    def stop_watchdog(self) -> bool:
        return self.watchdog.stop_watchdog()

    def start_kv_cache_monitor(self, interval_secs: float = 30.0,
                               growth_rate_warn_gb_per_min: float | None = None,
                               headroom_gb: float | None = None,
                               on_pressure: Callable[..., Any] | None = None,
                               **kwargs: Any) -> KVMonitorJob:
        return self.watchdog.start_kv_cache_monitor(interval_secs, growth_rate_warn_gb_per_min,
                                                    headroom_gb, on_pressure, **kwargs)

    def stop_kv_cache_monitor(self) -> bool:
        return self.watchdog.stop_kv_cache_monitor()

    def stop_all(self, timeout: float = 5.0) -> bool:
        """Stop every L5 job and the scheduler thread; True when the thread is gone."""
        return True if self._watchdog is None else self._watchdog.stop_all(timeout)

    def status(self) -> GuardStatus:
        from metal_guard.mode import describe_mode

        return GuardStatus(
            mode=describe_mode()["mode"],
            registered_threads_alive=len(self.registry.alive(exclude_current=False)),
            watchdog=self._watchdog.status() if self._watchdog else {"running": False, "jobs": {}},
        )

    # ------------------------------------------------------------------ breadcrumbs
    def _crumb_path(self) -> Path | None:
        chosen = self._breadcrumb_path
        return None if chosen is _DEFAULT or chosen is None else Path(chosen)

    def breadcrumb(self, msg: str) -> bool:
        if self._breadcrumb_path is None:
            return False
        from metal_guard.breadcrumbs import breadcrumb

        return breadcrumb(msg, log_path=self._crumb_path())

    def breadcrumb_with_meta(self, tag: str, payload: str = "", **meta: Any) -> bool:
        if self._breadcrumb_path is None:
            return False
        from metal_guard.breadcrumbs import breadcrumb_with_meta

        return breadcrumb_with_meta(tag, payload, log_path=self._crumb_path(), **meta)

    # ------------------------------------------------------------------ hardware
    @staticmethod
    def detect_hardware(**kwargs: Any) -> dict[str, Any]:
        return hardware.detect_hardware(**kwargs)

    @classmethod
    def recommended_config(cls, hardware_info: dict[str, Any] | None = None) -> dict[str, Any]:
        return hardware.recommended_config(hardware_info)

    @staticmethod
    def apple_gpu_family() -> dict[str, Any]:
        return hardware.apple_gpu_family()


#: The process-wide guard the seed documents (``from metal_guard import metal_guard``).
metal_guard = MetalGuard()
