"""L1 thread registry and L2 ordered cleanup.

The original panic root cause was freeing Metal memory on one thread while another was still
generating. So cleanup runs in a fixed order — wait for the registered GPU threads, collect
garbage, synchronise and clear the MLX cache, cool down — and:

* a registered thread that calls cleanup itself is skipped (it cannot wait for itself) instead
  of raising ``RuntimeError: cannot join current thread``;
* if another registered thread is still alive after the wait, defensive mode does **not** clear
  the cache (the race above); observer mode clears anyway and records that it would not have.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from metal_guard import backend
from metal_guard._results import ResultRecord
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.cleanup")

__all__ = ["CleanupResult", "ThreadRegistry", "flush_gpu", "kv_cache_clear_on_pressure", "safe_cleanup"]

Sleep = Callable[[float], Any]


@dataclass(frozen=True, eq=False)
class CleanupResult(ResultRecord):
    """What :func:`safe_cleanup` did (``as_dict()`` for JSON; ``result["flushed"]`` still works)."""

    #: registered GPU threads still alive after the wait
    waited_alive: int
    #: the MLX cache was synchronised and cleared
    flushed: bool
    #: the caller is itself a registered thread (it was not waited for)
    skipped_self: bool
    #: defensive mode did not clear the cache because GPU threads were still running
    flush_skipped: bool
    #: objects ``gc.collect()`` found
    gc_collected: int



class ThreadRegistry:
    """Threads that run MLX work. Thread-safe; dead threads are dropped as they are seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def register(self, thread: threading.Thread) -> threading.Thread:
        if not isinstance(thread, threading.Thread):
            raise TypeError(f"register_thread expects a threading.Thread, got {type(thread).__name__}")
        with self._lock:
            self._threads = [t for t in self._threads if (t.is_alive() or not t.ident) and t is not thread]
            self._threads.append(thread)
        return thread

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive() or not t.ident]
            return list(self._threads)

    def alive(self, *, exclude_current: bool = True) -> list[threading.Thread]:
        me = threading.current_thread()
        return [t for t in self.threads() if t.is_alive() and not (exclude_current and t is me)]

    def is_registered(self, thread: threading.Thread | None = None) -> bool:
        thread = thread or threading.current_thread()
        return any(t is thread for t in self.threads())

    def wait(self, timeout: float | None = 30.0, *, clock: Callable[[], float] = time.monotonic) -> int:
        """Join the other registered threads within ``timeout`` seconds in total (``None`` =
        forever); return how many are still alive. The calling thread is never joined."""
        me = threading.current_thread()
        if self.is_registered(me):
            log.debug("wait_for_threads called from registered thread %s; skipping it", me.name)
        deadline = None if timeout is None else clock() + max(0.0, timeout)
        for thread in self.alive():
            remaining = None if deadline is None else max(0.0, deadline - clock())
            thread.join(remaining)
        still = self.alive()
        if still:
            names = ",".join(t.name for t in still)
            log.warning("%d registered GPU thread(s) still alive after %ss: %s", len(still), timeout, names)
            _crumb("THREADS_ALIVE", names, count=len(still), timeout=timeout)
        return len(still)


def flush_gpu(*, load: bool = False) -> bool:
    """Synchronise MLX, then release its buffer cache. ``False`` when MLX is not loaded.

    On mlx >= 0.32 a deferred command-buffer error can surface in the synchronise; it is
    classified, logged and recorded, and the cache is still cleared.
    """
    if backend.loaded_core() is None and not load:
        return False
    try:
        backend.synchronize(load=load)
    except Exception as exc:
        from metal_guard.classify import classify_mlx_error

        cls = classify_mlx_error(exc)
        log.warning("MLX synchronize raised during flush (%s): %s", cls.name if cls else "unclassified", exc)
        _crumb("FLUSH_SYNC_ERROR", str(exc)[:200], error_class=cls.name if cls else "none")
    return backend.clear_cache(load=load)


def safe_cleanup(
    registry: ThreadRegistry | None = None, *, cooldown_secs: float = 2.0,
    thread_timeout_secs: float | None = 30.0, sleep: Sleep = time.sleep,
    settings: Settings | None = None, reason: str = "",
) -> CleanupResult:
    """wait for threads → ``gc.collect()`` → flush → cool down. Never raises for a registered
    caller. Returns what was done (:class:`CleanupResult`)."""
    settings = settings or get_settings()
    registry = registry or ThreadRegistry()
    me = threading.current_thread()
    skipped_self = registry.is_registered(me)
    _crumb("CLEANUP", "START", reason=reason or "-", thread=me.name, self_registered=skipped_self)
    alive = registry.wait(thread_timeout_secs)
    collected = gc.collect()
    flush_skipped = False
    if alive and settings.is_defensive:
        flush_skipped = True
        log.warning("not clearing the MLX cache: %d GPU thread(s) still running", alive)
        _crumb("CLEANUP", "FLUSH_SKIPPED", alive=alive)
        flushed = False
    else:
        if alive:
            _crumb("OBSERVE", "safe_cleanup would skip the flush", alive=alive)
        flushed = flush_gpu()
    if cooldown_secs > 0:
        sleep(cooldown_secs)
    _crumb("CLEANUP", "DONE", flushed=flushed, gc=collected)
    return CleanupResult(waited_alive=alive, flushed=flushed, skipped_self=skipped_self,
                         flush_skipped=flush_skipped, gc_collected=collected)


@contextlib.contextmanager
def guarded_cleanup(cleanup: Callable[[], Any]) -> Iterator[None]:
    """Run ``cleanup`` when the block exits, whether it raised or not."""
    try:
        yield
    finally:
        cleanup()


def kv_cache_clear_on_pressure(available_gb: float | None, growth_rate_gb_per_min: float | None,
                               *, settings: Settings | None = None) -> bool:
    """Ready-made ``on_pressure`` callback for the KV monitor: log and clear the MLX cache
    (observer mode only records). Returns whether the cache was cleared."""
    settings = settings or get_settings()
    avail = "unknown" if available_gb is None else f"{available_gb:.2f}GB"
    rate = "unknown" if growth_rate_gb_per_min is None else f"{growth_rate_gb_per_min:.2f}GB/min"
    if not settings.is_defensive:
        _crumb("OBSERVE", "kv pressure: would clear the MLX cache", available=avail, rate=rate)
        return False
    log.warning("KV-cache pressure (available %s, growth %s): clearing the MLX cache", avail, rate)
    return backend.clear_cache(load=False)
