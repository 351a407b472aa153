"""L4 fit checks: would this model fit, at which level of caution — and if not, which number said no.

The rule is decided from what **MLX itself can get**, not from a free-page count:

* the **working-set room**: the GPU's recommended working set (Metal), MLX's memory limit (CPU
  build) or device memory (CUDA), minus what this process already uses;
* the **MLX-limit room**: on Metal, ``mx.get_memory_limit()`` (by default
  ``min(1.5 * working set, 0.95 * RAM)``) minus what is used — MLX allocates up to it and then
  waits for memory rather than failing;
* the kernel's **memory pressure** (``normal`` / ``warn`` / ``critical``) as the tie-breaker.
  The system's "available" number (on macOS ``vm_stat`` free + inactive + speculative) leaves
  out compressible and purgeable memory that the OS hands over on demand, so only ``strict``
  uses it.

Levels (``METALGUARD_FIT_LEVEL``, default ``balanced``; names follow LM Studio's guardrails):

========  ===================================================================================
strict    fits the working-set room **and** the system's available memory, pressure normal
balanced  fits the working-set room (refused only under *critical* pressure); or fits the
          MLX-limit room while pressure is normal (or unknown)
relaxed   fits the MLX-limit room, whatever the pressure
off       never refuses (the numbers are still computed and reported, as for ``relaxed``)
========  ===================================================================================

Model sizes come, in order of preference, from a measured peak in the ledger, the caller's
figure, local safetensors / the Hugging Face cache, then the model name. A size or limit that
cannot be read gives ``unknown`` — never ``fits``. :func:`require_fit` refuses an unknown only at
``strict``; the other levels let it load with a warning (:func:`unknown_policy`, the one rule).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import ModelDoesNotFitError
from metal_guard.settings import FIT_LEVELS, Settings, get_settings

if TYPE_CHECKING:
    from metal_guard.memory import MemoryStats

log = logging.getLogger("metal_guard.memory")

__all__ = ["DEFAULT_FIT_LEVEL", "FitResult", "can_fit", "check_fit", "require_fit"]

GB = 1_000_000_000
FITS, DOES_NOT_FIT, UNKNOWN = "fits", "does_not_fit", "unknown"
DEFAULT_FIT_LEVEL = "balanced"
#: A measured peak already includes runtime allocations; only this margin is added to it.
LEDGER_MARGIN = 0.10
#: Limit sources under which MLX can allocate past the limit up to its own memory limit.
_WORKING_SET_SOURCES = ("metal_recommended_working_set",)


@dataclass(frozen=True)
class FitResult:
    """The answer of a fit check. ``bool(result)`` is True only for a known fit.

    ``available_bytes`` is the room the verdict was decided against; ``refused_by`` names the
    number that said no (``working_set``, ``mlx_memory_limit``, ``system_available``,
    ``pressure``) or is ``None``; ``level`` is the fit level applied.
    """

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
    level: str = DEFAULT_FIT_LEVEL
    refused_by: str | None = None
    working_set_room_bytes: int | None = None
    mlx_limit_room_bytes: int | None = None
    system_available_bytes: int | None = None
    pressure: str = "unknown"

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
    from metal_guard.hardware import recommended_config

    return float(recommended_config().get("overhead_gb", 2.0))


def _level(level: str | None) -> str:
    if level is None:
        return get_settings().fit_level
    if level not in FIT_LEVELS:
        raise ValueError(f"fit level must be one of {', '.join(FIT_LEVELS)}, not {level!r}")
    return level


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GB:.2f} GB"


@dataclass(frozen=True)
class _Rooms:
    ws: int
    mlx: int | None
    system: int | None
    pressure: str


def _rooms(stats: MemoryStats) -> _Rooms | None:
    if not stats.limit_bytes:
        return None
    used = stats.used_bytes or 0
    ws = max(0, stats.limit_bytes - used)
    mlx = None
    if stats.limit_source in _WORKING_SET_SOURCES and stats.mlx_limit_bytes:
        mlx = max(ws, stats.mlx_limit_bytes - used)
    return _Rooms(ws, mlx, stats.system_available_bytes, stats.pressure or "unknown")


def _decide(required: int, rooms: _Rooms, level: str) -> tuple[bool, str | None, int]:
    """(fits, refused_by, the room compared against)."""
    top = rooms.mlx if rooms.mlx is not None else rooms.ws
    if level == "strict":
        room = rooms.ws if rooms.system is None else min(rooms.ws, rooms.system)
        if required > rooms.ws:
            return False, "working_set", room
        if rooms.system is not None and required > rooms.system:
            return False, "system_available", room
        if rooms.pressure in ("warn", "critical"):
            return False, "pressure", room
        return True, None, room
    if level == "balanced":
        if required <= rooms.ws:
            if rooms.pressure == "critical":
                return False, "pressure", rooms.ws
            return True, None, rooms.ws
        if rooms.mlx is not None and required <= rooms.mlx:
            if rooms.pressure in ("warn", "critical"):
                return False, "pressure", rooms.mlx
            return True, None, rooms.mlx
        return False, ("mlx_memory_limit" if rooms.mlx is not None else "working_set"), top
    # relaxed / off
    if required <= top:
        return True, None, top
    return False, ("mlx_memory_limit" if rooms.mlx is not None else "working_set"), top


def _refusal_reason(required: int, rooms: _Rooms, refused_by: str, level: str,
                    stats: MemoryStats) -> str:
    used = stats.used_bytes or 0
    if refused_by == "working_set":
        why = (f"the memory limit ({stats.limit_source}, {_gb(stats.limit_bytes)}) leaves "
               f"{_gb(rooms.ws)} after {_gb(used)} in use")
    elif refused_by == "mlx_memory_limit":
        why = (f"MLX's memory limit ({_gb(stats.mlx_limit_bytes)}) leaves {_gb(rooms.mlx)} after "
               f"{_gb(used)} in use")
    elif refused_by == "system_available":
        why = (f"the system reports only {_gb(rooms.system)} available (free + inactive + "
               "speculative pages; the strict level counts only those)")
    else:
        why = f"the kernel reports memory pressure '{rooms.pressure}'"
    if level == "strict":
        relax = "METALGUARD_FIT_LEVEL=balanced (the default) decides from what MLX can get"
    elif level == "balanced":
        relax = "METALGUARD_FIT_LEVEL=relaxed (MLX's own limit, pressure ignored) or =off"
    else:
        relax = "METALGUARD_FIT_LEVEL=off"
    return (f"needs {_gb(required)}; {why} [fit level {level}]. To override: {relax}, or "
            "METALGUARD_FIT_CHECK=0 / fit_check=False")


def check_fit(model_size_gb: float | None = None, overhead_gb: float | None = None, *,
              model_name: str | os.PathLike[str] = "", context_tokens: int | None = None,
              stats: MemoryStats | None = None, use_ledger: bool = True,
              level: str | None = None) -> FitResult:
    """Would the model fit now, at ``level`` (default the ``fit_level`` setting)? See
    :class:`FitResult`. ``overhead_gb`` defaults to the tier's ``overhead_gb``."""
    from metal_guard import memory
    from metal_guard.ledger import lookup_peak
    from metal_guard.modelsize import estimate_model_size

    level = _level(level)
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
    stats = stats or memory.memory_stats()
    rooms = _rooms(stats)
    if size is not None:
        required = size + overhead
    refused_by: str | None = None
    available: int | None = None
    if required is None:
        verdict, reason = UNKNOWN, "model size unknown (no ledger entry, local weights or size in the name)"
    elif rooms is None:
        verdict, reason = UNKNOWN, "memory limit unknown (MLX unavailable or device info unreadable)"
    else:
        ok, refused_by, available = _decide(required, rooms, level)
        verdict = FITS if ok else DOES_NOT_FIT
        reason = "" if ok else _refusal_reason(required, rooms, str(refused_by), level, stats)
    return FitResult(name, verdict, required, available, size, overhead, source,
                     stats.limit_source, quant, reason, level, refused_by,
                     rooms.ws if rooms else None, rooms.mlx if rooms else None,
                     stats.system_available_bytes, stats.pressure or "unknown")


def can_fit(model_size_gb: float | None = None, overhead_gb: float | None = None, *,
            model_name: str | os.PathLike[str] = "", context_tokens: int | None = None,
            level: str | None = None) -> bool:
    """True only when the model is known to fit; an unknown size or limit gives ``False``
    (use :func:`check_fit` to tell "no" from "unknown")."""
    return check_fit(model_size_gb, overhead_gb, model_name=model_name,
                     context_tokens=context_tokens, level=level).verdict == FITS


def unknown_policy(level: str) -> str:
    """The one rule for a fit that cannot be decided: ``"refuse"`` at ``strict``, else ``"allow"``
    (loudly; ``off`` never refuses anything)."""
    return "refuse" if level == "strict" else "allow"


def require_fit(
    model_size_gb: float | None = None, model_name: str | os.PathLike[str] = "",
    overhead_gb: float | None = None, *, cache_clear_cb: Callable[[], Any] | None = None,
    escalated_cooldown_sec: float = 0.0, context_tokens: int | None = None,
    on_unknown: str | None = None, cleanup: Callable[[], Any] | None = None,
    settings: Settings | None = None, sleep: Callable[[float], Any] = time.sleep,
    level: str | None = None,
) -> FitResult:
    """Refuse a load that will not fit at the fit level (``level`` or the setting).

    Defensive mode: if it does not fit, run ``cleanup`` (``safe_cleanup``) and check again; with
    ``escalated_cooldown_sec > 0`` also call ``cache_clear_cb`` (errors logged), clean up, reset
    the MLX peak, wait, and check once more; then raise :class:`ModelDoesNotFitError` (a
    ``MemoryError``) whose message names the number that refused and how to override it.
    Level ``off`` and observer mode record the verdict and return it without cleaning up or
    raising.

    **Unknown** (the size or the limit cannot be read) follows one rule, on every path (this
    function, the load policy of ``install()`` and the decorators): level ``strict`` refuses it;
    ``balanced`` and ``relaxed`` let the load through *loudly* (a warning and a ``FIT_UNKNOWN``
    breadcrumb each time) — never worse than unguarded. ``on_unknown="refuse"`` / ``"allow"``
    decides for one call instead.
    """
    from metal_guard import backend

    settings = settings or get_settings()
    level = _level(level or settings.fit_level)
    name = os.fspath(model_name) if model_name else ""

    def check() -> FitResult:
        return check_fit(model_size_gb, overhead_gb, model_name=name,
                         context_tokens=context_tokens, level=level)

    result = check()
    if result.verdict == FITS:
        return result
    if level == "off":
        log.debug("fit level off: %s %s (%s); not refusing", name or "model", result.verdict,
                  result.reason)
        return result
    if not settings.is_defensive:
        _crumb("OBSERVE", f"require_fit would refuse: {result.reason}"[:300], model=name or "-",
               verdict=result.verdict, level=level)
        log.warning("observer mode: %s %s (%s); letting the load through",
                    name or "model", result.verdict, result.reason)
        return result
    if result.verdict == UNKNOWN:
        if on_unknown not in (None, "refuse", "allow"):
            raise ValueError(f"on_unknown must be 'refuse' or 'allow', got {on_unknown!r}")
        policy = on_unknown or unknown_policy(level)
        if policy == "allow":
            why = "on_unknown='allow'" if on_unknown else f"fit level {level}"
            message = (f"metal-guard cannot tell whether {name or 'the model'} fits ({result.reason}); "
                       f"loading it anyway ({why}). METALGUARD_FIT_LEVEL=strict refuses such loads.")
            log.warning("%s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            _crumb("FIT_UNKNOWN", result.reason, model=name or "-", action="allow", level=level)
            return result
        _crumb("FIT_REFUSED", result.reason, model=name or "-", verdict=UNKNOWN, level=level)
        raise ModelDoesNotFitError(
            f"cannot verify that {name or 'the model'} fits: {result.reason} [fit level {level}]. "
            "To load anyway: METALGUARD_FIT_LEVEL=balanced (loads it with a warning), "
            "on_unknown='allow', or observer mode.", model_name=name,
            required_bytes=result.required_bytes, available_bytes=result.available_bytes)
    log.warning("%s does not fit (%s); cleaning up and re-checking", name or "model", result.reason)
    if cleanup is not None:
        cleanup()
    result = check()
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
        result = check()
    if result.verdict == FITS:
        return result
    _crumb("FIT_REFUSED", result.reason[:300], model=name or "-", verdict=result.verdict,
           required=result.required_bytes, available=result.available_bytes,
           refused_by=result.refused_by or "-", level=level)
    raise ModelDoesNotFitError(
        f"{name or 'model'} does not fit: {result.reason} (size from {result.size_source}, "
        f"limit from {result.limit_source})", model_name=name,
        required_bytes=result.required_bytes, available_bytes=result.available_bytes)
