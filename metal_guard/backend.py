"""The only module that imports ``mlx.core``.

Everything else in metal-guard asks this module. It runs unchanged on the Metal, CUDA and CPU
builds of MLX and answers "unavailable" (``None`` / ``False``) when MLX is not installed —
never zeros that look like real readings.

Two ways to ask:

* :func:`core` imports MLX on demand (used by guards that are about to run MLX anyway);
* :func:`loaded_core` returns MLX only if *someone else* already imported it — the status
  writer and the panic gate use this so they never initialise Metal themselves.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger("metal_guard.backend")

__all__ = [
    "MemoryCounters",
    "backend_name",
    "clear_cache",
    "clear_streams",
    "core",
    "device_info",
    "get_memory_limit",
    "is_available",
    "loaded_core",
    "memory_counters",
    "mlx_version",
    "recommended_working_set_bytes",
    "reset_peak_memory",
    "set_cache_limit",
    "set_memory_limit",
    "synchronize",
]


@dataclass(frozen=True)
class MemoryCounters:
    """MLX allocator counters, in bytes. ``limit_bytes`` is MLX's (soft) memory limit."""

    active_bytes: int
    peak_bytes: int
    cache_bytes: int
    limit_bytes: int
    backend: str


@lru_cache(maxsize=1)
def is_available() -> bool:
    """True when the ``mlx`` package can be imported (does not import it)."""
    try:
        return importlib.util.find_spec("mlx") is not None
    except (ImportError, ValueError):
        return False


def core() -> Any | None:
    """Import and return ``mlx.core``, or ``None`` when MLX is missing or broken."""
    mod = sys.modules.get("mlx.core")
    if mod is not None:
        return mod
    if not is_available():
        return None
    try:
        import mlx.core as mx
    except Exception as exc:  # a broken install must not take the guard down
        log.debug("mlx.core import failed: %s", exc)
        return None
    return mx


def loaded_core() -> Any | None:
    """``mlx.core`` if it is already imported in this process, else ``None`` (no import)."""
    return sys.modules.get("mlx.core")


def _mx(load: bool) -> Any | None:
    return core() if load else loaded_core()


def backend_name(*, load: bool = True) -> str:
    """``"metal"``, ``"cuda"``, ``"cpu"`` or ``"none"`` (MLX missing)."""
    mx = _mx(load)
    if mx is None:
        return "none"
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    try:
        cuda = getattr(mx, "cuda", None)
        if cuda is not None and cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return "cpu"


def mlx_version() -> str | None:
    """Installed MLX version from package metadata (no import)."""
    from importlib import metadata

    try:
        return metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return None


def memory_counters(*, load: bool = True) -> MemoryCounters | None:
    """Active / peak / cache / limit bytes from MLX, or ``None`` when unavailable."""
    mx = _mx(load)
    if mx is None:
        return None
    try:
        return MemoryCounters(
            active_bytes=int(mx.get_active_memory()),
            peak_bytes=int(mx.get_peak_memory()),
            cache_bytes=int(mx.get_cache_memory()),
            limit_bytes=int(mx.get_memory_limit()),
            backend=backend_name(load=False),
        )
    except Exception as exc:
        log.debug("reading MLX memory counters failed: %s", exc)
        return None


def device_info(*, load: bool = True) -> dict[str, Any] | None:
    """``mx.device_info()`` for the default device (GPU when present), or ``None``."""
    mx = _mx(load)
    if mx is None:
        return None
    try:
        info = dict(mx.device_info())
        if backend_name(load=False) in ("metal", "cuda"):
            gpu = dict(mx.device_info(mx.gpu))
            info = gpu or info
        return info
    except Exception as exc:
        log.debug("mx.device_info() failed: %s", exc)
        return None


def recommended_working_set_bytes(*, load: bool = True) -> int | None:
    """The GPU's recommended working set (Metal) or total memory (CUDA); ``None`` on CPU."""
    info = device_info(load=load)
    if not info:
        return None
    for key in ("max_recommended_working_set_size", "total_memory"):
        value = info.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def synchronize(*, load: bool = False) -> bool:
    """Wait for queued MLX work to finish. Returns False when MLX is unavailable.

    Errors MLX raises here (on mlx >= 0.32 this is where a deferred command-buffer error
    surfaces) propagate to the caller.
    """
    mx = _mx(load)
    if mx is None:
        return False
    mx.synchronize()
    return True


def clear_cache(*, load: bool = False) -> bool:
    """Release MLX's buffer cache. Returns False when MLX is unavailable."""
    mx = _mx(load)
    if mx is None:
        return False
    mx.clear_cache()
    return True


def clear_streams() -> bool:
    """Destroy the MLX streams the *calling thread* created (``mx.clear_streams()``, MLX >= 0.32).

    A thread that used MLX must call this before it ends: on MLX 0.32 its thread-local streams
    are otherwise torn down at thread exit without the GIL, and the process can abort with
    ``terminate called without an active exception``. Never imports MLX (a thread of a process
    that never imported it has no streams); a no-op returning False when MLX is not loaded or
    has no ``clear_streams``. Never raises: it runs at thread exit, where nobody can handle it.
    """
    mx = loaded_core()
    fn = getattr(mx, "clear_streams", None) if mx is not None else None
    if fn is None:
        return False
    try:
        fn()
    except Exception as exc:
        log.debug("mx.clear_streams() failed: %s", exc)
        return False
    return True


def reset_peak_memory(*, load: bool = False) -> bool:
    mx = _mx(load)
    if mx is None:
        return False
    mx.reset_peak_memory()
    return True


def get_memory_limit(*, load: bool = True) -> int | None:
    mx = _mx(load)
    if mx is None:
        return None
    try:
        return int(mx.get_memory_limit())
    except Exception:
        return None


def set_memory_limit(limit_bytes: int) -> int | None:
    """Set MLX's memory limit; returns the previous one (``None`` without MLX).

    On the CPU build MLX accepts the limit but does not enforce it.
    """
    mx = core()
    if mx is None:
        return None
    return int(mx.set_memory_limit(int(limit_bytes)))


def set_cache_limit(limit_bytes: int) -> int | None:
    mx = core()
    if mx is None:
        return None
    return int(mx.set_cache_limit(int(limit_bytes)))


def eval_probe() -> bool:
    """Run a trivial evaluation on the default device; False without MLX."""
    mx = core()
    if mx is None:
        return False
    mx.eval(mx.zeros(1))
    return True
