"""Memory truth, fit checks, pressure and headroom (L4, L5 statistics).

* :class:`MemoryStats` — MLX allocator counters **and** the process footprint (macOS
  ``ri_phys_footprint``, which includes Metal buffers MLX does not count) **and** system memory.
  A number that cannot be read is ``None``, never a zero that looks like a reading.
* Fit checks (:mod:`metal_guard.fit`, re-exported here) decide from what MLX can get, at a
  level (strict / balanced / relaxed / off); a check whose size or limit is unknown says
  ``unknown`` — never ``fits``.

The ledger and size-estimate names are re-exported here so ``metal_guard.memory.record_peak``
and friends keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from metal_guard import backend
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.hardware import process_footprint, system_memory
from metal_guard.ledger import forget_peaks as forget_peaks
from metal_guard.ledger import ledger_entries as ledger_entries
from metal_guard.ledger import lookup_peak as lookup_peak
from metal_guard.ledger import measure_peak as measure_peak
from metal_guard.ledger import record_peak as record_peak
from metal_guard.modelsize import ModelSize as ModelSize
from metal_guard.modelsize import estimate_model_size as estimate_model_size
from metal_guard.modelsize import estimate_model_size_from_name as estimate_model_size_from_name
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.memory")

__all__ = [
    "FitResult",
    "MemoryStats",
    "ModelSize",
    "can_fit",
    "check_fit",
    "ensure_headroom",
    "estimate_model_size",
    "estimate_model_size_from_name",
    "forget_peaks",
    "is_pressure_high",
    "ledger_entries",
    "log_memory",
    "lookup_peak",
    "measure_peak",
    "memory_stats",
    "record_peak",
    "require_fit",
]

GB = 1_000_000_000


def _gb(value: int | None) -> float | None:
    return None if value is None else value / GB


@dataclass(frozen=True)
class MemoryStats:
    """One snapshot. Every size is in bytes; ``None`` means "could not be read".

    ``limit_bytes`` is the budget MLX work has: the GPU's recommended working set on Metal,
    total device memory on CUDA, MLX's memory limit on the CPU build (``limit_source`` says
    which); ``mlx_limit_bytes`` is ``mx.get_memory_limit()`` (on Metal MLX allocates past the
    working set up to it). ``footprint_bytes`` is the process footprint (``footprint_source``:
    ``ri_phys_footprint`` on macOS, ``psutil_rss`` elsewhere).
    """

    active_bytes: int | None = None
    peak_bytes: int | None = None
    limit_bytes: int | None = None
    cache_bytes: int | None = None
    limit_source: str = "unknown"
    mlx_limit_bytes: int | None = None
    footprint_bytes: int | None = None
    footprint_source: str = "unknown"
    system_total_bytes: int | None = None
    system_available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_used_bytes: int | None = None
    pressure: str = "unknown"
    pressure_level: int | None = None
    backend: str = "none"
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def limit_known(self) -> bool:
        return bool(self.limit_bytes)

    @property
    def used_bytes(self) -> int | None:
        """Memory this process holds: the larger of MLX active bytes and the footprint."""
        known = [v for v in (self.active_bytes, self.footprint_bytes) if v is not None]
        return max(known) if known else None

    @property
    def available_bytes(self) -> int | None:
        """Headroom: ``limit - used``, capped by the system's available memory; ``None`` if the
        limit is unknown."""
        if not self.limit_bytes:
            return None
        room = self.limit_bytes - (self.used_bytes or 0)
        if self.system_available_bytes is not None:
            room = min(room, self.system_available_bytes)
        return max(0, room)

    def _pct(self, value: int | None) -> float | None:
        if not self.limit_bytes or value is None:
            return None
        return 100.0 * value / self.limit_bytes

    active_gb = property(lambda self: _gb(self.active_bytes))
    peak_gb = property(lambda self: _gb(self.peak_bytes))
    cache_gb = property(lambda self: _gb(self.cache_bytes))
    limit_gb = property(lambda self: _gb(self.limit_bytes))
    footprint_gb = property(lambda self: _gb(self.footprint_bytes))
    used_gb = property(lambda self: _gb(self.used_bytes))
    available_gb = property(lambda self: _gb(self.available_bytes))
    active_pct = property(lambda self: self._pct(self.active_bytes))
    peak_pct = property(lambda self: self._pct(self.peak_bytes))
    used_pct = property(lambda self: self._pct(self.used_bytes))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["taken_at"] = self.taken_at.isoformat()
        out.update(used_bytes=self.used_bytes, available_bytes=self.available_bytes,
                   used_pct=self.used_pct, active_pct=self.active_pct, peak_pct=self.peak_pct)
        return out

    def describe(self) -> str:
        def fmt(v: float | None, unit: str = "GB") -> str:
            return "unknown" if v is None else f"{v:.2f}{unit}"

        return (f"active={fmt(self.active_gb)} peak={fmt(self.peak_gb)} cache={fmt(self.cache_gb)} "
                f"footprint={fmt(self.footprint_gb)} limit={fmt(self.limit_gb)}({self.limit_source}) "
                f"available={fmt(self.available_gb)} pressure={self.pressure}")


def _limit(counters: backend.MemoryCounters | None) -> tuple[int | None, str]:
    if counters is None:
        return None, "unknown"
    if counters.backend in ("metal", "cuda"):
        working_set = backend.recommended_working_set_bytes(load=False)
        if working_set:
            name = "metal_recommended_working_set" if counters.backend == "metal" else "cuda_total_memory"
            return working_set, name
    if counters.limit_bytes > 0:
        return counters.limit_bytes, "mlx_memory_limit"
    return None, "unknown"


def memory_stats(*, load: bool = True) -> MemoryStats:
    """Read a :class:`MemoryStats` now.

    ``load=False`` never imports MLX: if nothing imported it yet, the MLX counters (and so the
    limit) are ``None`` while footprint and system memory are still read.
    """
    counters = backend.memory_counters(load=load)
    limit, limit_source = _limit(counters)
    fp = process_footprint()
    sysmem = system_memory()
    return MemoryStats(
        active_bytes=counters.active_bytes if counters else None,
        peak_bytes=counters.peak_bytes if counters else None,
        limit_bytes=limit,
        cache_bytes=counters.cache_bytes if counters else None,
        limit_source=limit_source,
        mlx_limit_bytes=counters.limit_bytes if counters and counters.limit_bytes > 0 else None,
        footprint_bytes=fp.footprint_bytes if fp else None,
        footprint_source=fp.source if fp else "unknown",
        system_total_bytes=sysmem.total_bytes,
        system_available_bytes=sysmem.available_bytes,
        swap_total_bytes=sysmem.swap_total_bytes,
        swap_used_bytes=sysmem.swap_used_bytes,
        pressure=sysmem.pressure,
        pressure_level=sysmem.pressure_level,
        backend=counters.backend if counters else backend.backend_name(load=False),
    )


def is_pressure_high(threshold_pct: float = 67.0, model_name: str = "", *,
                     stats: MemoryStats | None = None) -> bool:
    """True when used memory (MLX active or footprint, whichever is larger — not the sticky
    peak) is at least ``threshold_pct`` of the limit, or the kernel reports warn/critical
    pressure. An unknown limit with normal/unknown pressure is ``False`` (logged at DEBUG)."""
    stats = stats or memory_stats()
    if stats.pressure in ("warn", "critical"):
        return True
    pct = stats.used_pct
    if pct is None:
        log.debug("pressure check%s: limit unknown", f" for {model_name}" if model_name else "")
        return False
    return pct >= threshold_pct


def log_memory(label: str, model_name: str = "", *, stats: MemoryStats | None = None) -> MemoryStats:
    """Log one INFO line with the current numbers; return them."""
    stats = stats or memory_stats()
    log.info("[%s]%s %s", label, f" {model_name}" if model_name else "", stats.describe())
    return stats



def ensure_headroom(model_name: str = "", threshold_pct: float = 67.0, *,
                    cleanup: Callable[[], Any] | None = None,
                    settings: Settings | None = None) -> MemoryStats:
    """If pressure is high: defensive mode runs ``cleanup`` and resets the MLX peak; observer
    mode only records what it would have done. Returns the numbers afterwards."""
    settings = settings or get_settings()
    stats = memory_stats()
    if not is_pressure_high(threshold_pct, model_name, stats=stats):
        return stats
    if not settings.is_defensive:
        _crumb("OBSERVE", "ensure_headroom would clean up", model=model_name or "-",
               used_pct=f"{stats.used_pct or 0:.1f}", pressure=stats.pressure)
        return stats
    log.warning("memory pressure before %s: %s; cleaning up", model_name or "load", stats.describe())
    if cleanup is not None:
        cleanup()
    backend.reset_peak_memory(load=False)
    return memory_stats()


# --------------------------------------------------------------------------- fit checks
# The fit checks live in metal_guard.fit (levels, the rule, refusals); re-exported here.

from metal_guard.fit import DOES_NOT_FIT as DOES_NOT_FIT  # noqa: E402
from metal_guard.fit import FITS as FITS  # noqa: E402
from metal_guard.fit import LEDGER_MARGIN as LEDGER_MARGIN  # noqa: E402
from metal_guard.fit import UNKNOWN as UNKNOWN  # noqa: E402
from metal_guard.fit import FitResult as FitResult  # noqa: E402
from metal_guard.fit import can_fit as can_fit  # noqa: E402
from metal_guard.fit import check_fit as check_fit  # noqa: E402
from metal_guard.fit import require_fit as require_fit  # noqa: E402
