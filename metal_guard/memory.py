"""Memory truth, fit checks, pressure and headroom (L4, L5 statistics).

* :class:`MemoryStats` — MLX allocator counters **and** the process footprint (macOS
  ``ri_phys_footprint``, which includes Metal buffers MLX does not count) **and** system memory.
  A number that cannot be read is ``None``, never a zero that looks like a reading.
* Fit checks size a model from, in order of preference: a measured peak in the ledger
  (:mod:`metal_guard.ledger`), the caller's figure, the safetensors of a local directory or
  Hugging Face cache snapshot, and the model name (:mod:`metal_guard.modelsize`). A check whose
  size or limit is unknown says ``unknown`` — never ``fits``.

The ledger and size-estimate names are re-exported here so ``metal_guard.memory.record_peak``
and friends keep working.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from metal_guard import backend
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import ModelDoesNotFitError
from metal_guard.hardware import process_footprint, recommended_config
from metal_guard.hardware import process_footprint_bytes as process_footprint_bytes
from metal_guard.hardware import system_memory as system_memory
from metal_guard.ledger import LEDGER_FILE as LEDGER_FILE
from metal_guard.ledger import PeakMeasurement as PeakMeasurement
from metal_guard.ledger import forget_peaks as forget_peaks
from metal_guard.ledger import ledger_entries as ledger_entries
from metal_guard.ledger import ledger_path as ledger_path
from metal_guard.ledger import lookup_peak as lookup_peak
from metal_guard.ledger import measure_peak as measure_peak
from metal_guard.ledger import record_peak as record_peak
from metal_guard.modelsize import ModelSize as ModelSize
from metal_guard.modelsize import estimate_model_size as estimate_model_size
from metal_guard.modelsize import estimate_model_size_from_name as estimate_model_size_from_name
from metal_guard.modelsize import hf_cache_dir as hf_cache_dir
from metal_guard.modelsize import hf_snapshot_dir as hf_snapshot_dir
from metal_guard.modelsize import quantization_from_config as quantization_from_config
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.memory")

__all__ = [
    "FitResult",
    "LEDGER_FILE",
    "MemoryStats",
    "ModelSize",
    "PeakMeasurement",
    "can_fit",
    "check_fit",
    "ensure_headroom",
    "estimate_model_size",
    "estimate_model_size_from_name",
    "forget_peaks",
    "hf_cache_dir",
    "hf_snapshot_dir",
    "is_pressure_high",
    "ledger_entries",
    "ledger_path",
    "log_memory",
    "lookup_peak",
    "measure_peak",
    "memory_stats",
    "process_footprint_bytes",
    "quantization_from_config",
    "record_peak",
    "require_fit",
    "system_memory",
]

GB = 1_000_000_000


def _gb(value: int | None) -> float | None:
    return None if value is None else value / GB


@dataclass(frozen=True)
class MemoryStats:
    """One snapshot. Every size is in bytes; ``None`` means "could not be read".

    ``limit_bytes`` is the budget MLX work has: the GPU's recommended working set on Metal,
    total device memory on CUDA, MLX's memory limit on the CPU build (``limit_source`` says
    which). ``footprint_bytes`` is the process footprint (``footprint_source``:
    ``ri_phys_footprint`` on macOS, ``psutil_rss`` elsewhere).
    """

    active_bytes: int | None = None
    peak_bytes: int | None = None
    limit_bytes: int | None = None
    cache_bytes: int | None = None
    limit_source: str = "unknown"
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

FITS, DOES_NOT_FIT, UNKNOWN = "fits", "does_not_fit", "unknown"
#: A measured peak already includes runtime allocations; only this margin is added to it.
LEDGER_MARGIN = 0.10


@dataclass(frozen=True)
class FitResult:
    """The answer of a fit check. ``bool(result)`` is True only for a known fit."""

    model: str
    verdict: str  # "fits" | "does_not_fit" | "unknown"
    required_bytes: int | None
    available_bytes: int | None
    size_bytes: int | None
    overhead_bytes: int
    size_source: str  # "ledger" | "caller" | "safetensors" | "hf_cache" | "name" | "unknown"
    limit_source: str
    quantization: str | None = None
    reason: str = ""

    @property
    def fits(self) -> bool | None:
        return None if self.verdict == UNKNOWN else self.verdict == FITS

    def __bool__(self) -> bool:
        return self.verdict == FITS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _overhead_gb(overhead_gb: float | None) -> float:
    if overhead_gb is not None:
        return float(overhead_gb)
    return float(recommended_config().get("overhead_gb", 2.0))


def check_fit(model_size_gb: float | None = None, overhead_gb: float | None = None, *,
              model_name: str | os.PathLike[str] = "", context_tokens: int | None = None,
              stats: MemoryStats | None = None, use_ledger: bool = True) -> FitResult:
    """Would the model fit now? See :class:`FitResult`. ``overhead_gb`` defaults to the
    hardware tier's ``overhead_gb`` (``recommended_config()``)."""
    name = os.fspath(model_name) if model_name else ""
    overhead = int(_overhead_gb(overhead_gb) * GB)
    estimate = estimate_model_size(name) if name else None
    quant = estimate.quantization if estimate else None
    size, source, required = None, "unknown", None
    entry = lookup_peak(name, quantization=quant, context_tokens=context_tokens) \
        if (name and use_ledger) else None
    if entry is not None:
        size, source = int(entry["required_bytes"]), "ledger"
        overhead = int(size * LEDGER_MARGIN)
    elif model_size_gb is not None:
        if model_size_gb < 0:
            raise ValueError(f"model_size_gb must be >= 0, got {model_size_gb!r}")
        size, source = int(model_size_gb * GB), "caller"
    elif estimate is not None and estimate.size_bytes is not None:
        size, source = estimate.size_bytes, estimate.source
    stats = stats or memory_stats()
    available = stats.available_bytes
    if size is not None:
        required = size + overhead
    if required is None:
        verdict, reason = UNKNOWN, "model size unknown (no ledger entry, local weights or size in the name)"
    elif available is None:
        verdict, reason = UNKNOWN, "memory limit unknown (MLX unavailable or device info unreadable)"
    elif required <= available:
        verdict, reason = FITS, ""
    else:
        verdict = DOES_NOT_FIT
        reason = f"needs {required / GB:.2f}GB, {available / GB:.2f}GB available"
    return FitResult(name, verdict, required, available, size, overhead, source,
                     stats.limit_source, quant, reason)


def can_fit(model_size_gb: float | None = None, overhead_gb: float | None = None, *,
            model_name: str | os.PathLike[str] = "", context_tokens: int | None = None) -> bool:
    """True only when the model is known to fit; an unknown size or limit gives ``False``
    (use :func:`check_fit` to tell "no" from "unknown")."""
    return check_fit(model_size_gb, overhead_gb, model_name=model_name,
                     context_tokens=context_tokens).verdict == FITS


def require_fit(
    model_size_gb: float | None = None, model_name: str | os.PathLike[str] = "",
    overhead_gb: float | None = None, *, cache_clear_cb: Callable[[], Any] | None = None,
    escalated_cooldown_sec: float = 0.0, context_tokens: int | None = None,
    on_unknown: str | None = None, cleanup: Callable[[], Any] | None = None,
    settings: Settings | None = None, sleep: Callable[[float], Any] = time.sleep,
) -> FitResult:
    """Refuse a load that will not fit.

    Defensive mode: if it does not fit, run ``cleanup`` (``safe_cleanup``) and check again; with
    ``escalated_cooldown_sec > 0`` also call ``cache_clear_cb`` (errors logged), clean up, reset
    the MLX peak, wait, and check once more; then raise :class:`ModelDoesNotFitError` (a
    ``MemoryError``). An ``unknown`` verdict is refused too unless ``on_unknown="allow"``.
    Observer mode records the verdict and returns it without cleaning up or raising.
    """
    settings = settings or get_settings()
    name = os.fspath(model_name) if model_name else ""
    result = check_fit(model_size_gb, overhead_gb, model_name=name, context_tokens=context_tokens)
    if result.verdict == FITS:
        return result
    if not settings.is_defensive:
        _crumb("OBSERVE", f"require_fit would refuse: {result.reason}", model=name or "-",
               verdict=result.verdict)
        log.warning("observer mode: %s %s (%s); letting the load through",
                    name or "model", result.verdict, result.reason)
        return result
    if result.verdict == UNKNOWN:
        policy = on_unknown or "refuse"
        if policy not in ("refuse", "allow"):
            raise ValueError(f"on_unknown must be 'refuse' or 'allow', got {on_unknown!r}")
        if policy == "allow":
            log.warning("fit of %s unknown (%s); allowed by on_unknown='allow'", name or "model", result.reason)
            _crumb("FIT_UNKNOWN", result.reason, model=name or "-", action="allow")
            return result
        _crumb("FIT_REFUSED", result.reason, model=name or "-", verdict=UNKNOWN)
        raise ModelDoesNotFitError(
            f"cannot verify that {name or 'the model'} fits: {result.reason}. Pass on_unknown='allow' "
            "(or use observer mode) to load anyway.", model_name=name,
            required_bytes=result.required_bytes, available_bytes=result.available_bytes)
    log.warning("%s does not fit (%s); cleaning up and re-checking", name or "model", result.reason)
    if cleanup is not None:
        cleanup()
    result = check_fit(model_size_gb, overhead_gb, model_name=name, context_tokens=context_tokens)
    if result.verdict != FITS and escalated_cooldown_sec > 0:
        if cache_clear_cb is not None:
            try:
                cache_clear_cb()
            except Exception as exc:
                log.warning("cache_clear_cb failed: %s", exc)
        if cleanup is not None:
            cleanup()
        backend.reset_peak_memory(load=False)
        sleep(escalated_cooldown_sec)
        result = check_fit(model_size_gb, overhead_gb, model_name=name, context_tokens=context_tokens)
    if result.verdict == FITS:
        return result
    _crumb("FIT_REFUSED", result.reason, model=name or "-", verdict=result.verdict,
           required=result.required_bytes, available=result.available_bytes)
    raise ModelDoesNotFitError(
        f"{name or 'model'} does not fit: {result.reason} (size from {result.size_source}, "
        f"limit from {result.limit_source})", model_name=name,
        required_bytes=result.required_bytes, available_bytes=result.available_bytes)
