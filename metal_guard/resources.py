"""L14: inferences since the last cold restart, as a proxy for Metal descriptor leaks.

MLX fails with ``[metal::malloc] Resource limit (499000) exceeded`` when a process has created
too many Metal buffers; ``mx.clear_cache()`` does not give those descriptors back — only a new
process does. :class:`ResourceTracker` counts inferences and says when a worker should be
restarted pre-emptively. It counts *calls*, not descriptors (MLX exposes no descriptor count);
the device's ``resource_limit`` is reported alongside for context.

Precedence: an explicit ``cold_restart_after`` beats ``METALGUARD_COLD_RESTART_AFTER_N``, which
beats the default 4000. ``METALGUARD_COLD_RESTART_DISABLED=1`` makes
:meth:`ResourceTracker.should_cold_restart` always ``False``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from metal_guard.settings import get_settings

__all__ = ["ResourceTracker", "global_resource_tracker"]


class ResourceTracker:
    """Thread-safe inference counter with a cold-restart threshold."""

    def __init__(self, cold_restart_after: int | None = None) -> None:
        if cold_restart_after is not None and (
            isinstance(cold_restart_after, bool) or int(cold_restart_after) < 1
        ):
            raise ValueError(f"cold_restart_after must be a whole number >= 1, got {cold_restart_after!r}")
        self._explicit = None if cold_restart_after is None else int(cold_restart_after)
        self._lock = threading.Lock()
        self._count = 0
        self._restarts = 0
        self._last_restart_at_count: int | None = None
        self._last_restart_at: float | None = None

    @property
    def cold_restart_after(self) -> int:
        """The threshold now in force (explicit > environment > 4000)."""
        return self._explicit if self._explicit is not None else get_settings().cold_restart_after_n

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def record_inference(self, n: int = 1) -> int:
        """Count ``n`` inferences; return the new total."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._count += int(n)
            return self._count

    def should_cold_restart(self) -> bool:
        if get_settings().cold_restart_disabled:
            return False
        return self.count >= self.cold_restart_after

    def reset(self) -> int:
        """Call after the worker was restarted; returns the count before the reset."""
        with self._lock:
            prior = self._count
            self._last_restart_at_count = prior
            self._last_restart_at = time.time()
            self._restarts += 1
            self._count = 0
            return prior

    def snapshot(self) -> dict[str, Any]:
        from metal_guard import backend

        threshold = self.cold_restart_after
        with self._lock:
            count, last, restarts = self._count, self._last_restart_at_count, self._restarts
        info = backend.device_info(load=False) or {}
        limit = info.get("resource_limit")
        return {
            "current_count": count,
            "threshold": threshold,
            "fraction_used": round(count / threshold, 4) if threshold else None,
            "last_restart_at_count": last,
            "restarts": restarts,
            "kill_switch_active": get_settings().cold_restart_disabled,
            "should_cold_restart": self.should_cold_restart(),
            "resource_limit_descriptors": limit if isinstance(limit, int) else None,
        }


_global: ResourceTracker | None = None
_global_lock = threading.Lock()


def global_resource_tracker() -> ResourceTracker:
    """The process-wide tracker (created on first use, thread-safely)."""
    global _global
    with _global_lock:
        if _global is None:
            _global = ResourceTracker()
        return _global


def _reset_global_resource_tracker() -> None:
    """Test hook: forget the process-wide tracker."""
    global _global
    with _global_lock:
        _global = None
