"""The individual steps of :mod:`metal_guard.policy`, each calling one building block lazily.

Every step imports its layer inside the function. A layer that is missing (an older install,
a partial checkout) is skipped with one debug line; a layer that fails unexpectedly is skipped
with a warning — a guard must never be the reason a user's call breaks. Refusals (subclasses
of :class:`~metal_guard.errors.MetalGuardError`) are raised in defensive mode and recorded and
let through in observer mode.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.settings import Settings

log = logging.getLogger("metal_guard.policy")

_missing_logged: set[str] = set()
_first_gen_lock = threading.Lock()
_first_gen_seen: set[int] = set()


_LAYERS: dict[str, Any] = {}


def _layer(name: str) -> Any | None:
    module = _LAYERS.get(name)
    if module is not None:
        return module
    try:
        module = _LAYERS[name] = importlib.import_module(name)
        return module
    except ImportError as exc:
        if name not in _missing_logged:
            _missing_logged.add(name)
            log.debug("guard layer %s unavailable (%s); that step is skipped", name, exc)
        return None



def _step(name: str, fn: Callable[[], Any], mode: str, model_id: str) -> Any:
    """Run one check: refusals raise (defensive) or are recorded (observer); bugs are logged."""
    from metal_guard.errors import MetalGuardError

    try:
        return fn()
    except MetalGuardError as exc:
        if mode == "defensive":
            raise
        _crumb("OBSERVE", f"{name} would refuse: {exc}"[:300], model=model_id, error=type(exc).__name__)
        log.warning("observer mode: %s would refuse %s (%s); letting it through", name, model_id, exc)
        return None
    except Exception as exc:
        log.warning("guard step %s failed (%s: %s); continuing without it", name, type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------- load


def before_load(model_id: str, info: Any, pol: Mapping[str, Any], s: Settings) -> None:
    """Gate, breaker, registry, fit, cadence — in that order (cheapest refusal first, cadence
    last because it records the load)."""
    mode = s.mode
    if pol.get("gate", True):
        gate = _layer("metal_guard.forensics.gate")
        if gate is not None:
            _step("panic gate", lambda: _gate(gate, s), mode, model_id)
    if pol.get("breaker", True):
        breaker = _layer("metal_guard.breaker")
        if breaker is not None:
            _step("circuit breaker", lambda: breaker.CircuitBreaker().check(), mode, model_id)
    if pol.get("registry", True):
        registry = _layer("metal_guard.knowledge.registry")
        if registry is not None:
            _step("known-panic registry", lambda: registry.enforce_known_panic_policy(
                model_id, allow=s.allow_panic_models, settings=s), mode, model_id)
    if s.fit_check:
        memory = _layer("metal_guard.memory")
        if memory is not None:
            _step("fit check", lambda: memory.require_fit(
                model_name=info.local_path or model_id, on_unknown="allow", settings=s,
                cleanup=light_cleanup), mode, model_id)
    if s.cadence:
        cadence = _layer("metal_guard.cadence")
        if cadence is not None:
            def check_and_mark() -> None:
                previous = cadence.CadenceGuard().last_ts(model_id)
                at = cadence.require_cadence_clear(
                    model_id, min_interval_sec=s.cadence_min_interval_sec,
                    cross_model_interval_sec=s.cross_model_interval_sec)
                info.extra["cadence_mark"] = (at, previous)  # rolled back if the load fails

            _step("cadence", check_and_mark, mode, model_id)


def _gate(gate: Any, s: Settings) -> None:
    verdict = gate.evaluate_panic_cooldown(settings=s)
    if verdict.exit_code == 2:
        from metal_guard.errors import PanicCooldownActive

        raise PanicCooldownActive(verdict)
    if verdict.exit_code >= 3:
        log.warning("panic gate could not evaluate (%s); proceeding", verdict.reason)


@contextlib.contextmanager
def load_lock(model_id: str, s: Settings) -> Iterator[None]:
    """The L8 cross-process lock around the load, when ``use_lock`` is on."""
    if not s.use_lock:
        yield
        return
    lock = _layer("metal_guard.lock")
    if lock is None:
        yield
        return
    with lock.mlx_exclusive_lock(f"load {model_id}"[:200]):
        yield


def start_load(model_id: str, info: Any) -> None:
    _crumb("LOAD", "START", model=model_id, site=info.site)
    backend = _layer("metal_guard.backend")
    if backend is not None:
        with contextlib.suppress(Exception):
            backend.reset_peak_memory(load=False)


def load_failed(model_id: str, info: Any, exc: BaseException) -> None:
    _crumb("LOAD", "FAILED", model=model_id, error=type(exc).__name__, detail=str(exc)[:200])
    mark = info.extra.pop("cadence_mark", None)
    if mark is not None:
        _rollback_cadence(model_id, *mark)


def _rollback_cadence(model_id: str, at: float, previous: float | None) -> None:
    """A failed load is never a load for the cadence: put back the record it replaced, unless
    another load was recorded since (the read-then-restore is not atomic; a concurrent record
    of the same model in between is kept)."""
    cadence = _layer("metal_guard.cadence")
    if cadence is None:
        return
    try:
        guard = cadence.CadenceGuard()
        if guard.last_ts(model_id) != at:
            return
        if previous is None:
            guard.reset(model_id)
        else:
            guard.mark_load(model_id, ts=previous)
    except Exception as exc:
        log.warning("could not roll back the cadence record of a failed load of %s: %s", model_id, exc)


def load_done(model_id: str, info: Any, elapsed_sec: float) -> None:
    peak = _peak_bytes()
    _crumb("LOAD", "DONE", model=model_id, elapsed_sec=f"{elapsed_sec:.3f}", peak_bytes=peak)
    _record_peak(model_id, peak)


def _peak_bytes() -> int | None:
    backend = _layer("metal_guard.backend")
    counters = backend.memory_counters(load=False) if backend is not None else None
    return counters.peak_bytes if counters is not None else None


def _record_peak(model_id: str, peak: int | None) -> None:
    if not peak:
        return
    ledger = _layer("metal_guard.ledger")
    if ledger is None:
        return
    try:
        ledger.record_peak(model_id, peak)
    except Exception as exc:
        log.debug("peak ledger record failed: %s", exc)


def light_cleanup() -> None:
    """gc + MLX cache release (no sleep): what a fit check runs before re-checking."""
    gc.collect()
    backend = _layer("metal_guard.backend")
    if backend is not None:
        with contextlib.suppress(Exception):
            backend.clear_cache(load=False)


# --------------------------------------------------------------------------- generate


def count_inferences(n: int) -> None:
    resources = _layer("metal_guard.resources")
    if resources is not None:
        try:
            resources.global_resource_tracker().record_inference(max(0, int(n)))
        except Exception as exc:
            log.debug("resource tracker: %s", exc)


def periodic_flush(number: int) -> None:
    """Release MLX's buffer cache every N guarded generate calls (agent loops)."""
    backend = _layer("metal_guard.backend")
    if backend is not None:
        with contextlib.suppress(Exception):
            backend.clear_cache(load=False)
    log.debug("periodic flush after %d guarded generate calls", number)


def first_generation_flush(info: Any, pol: Mapping[str, Any], hot: Settings) -> None:
    """C7: before a gemma-4 model's first generation, synchronise, flush and pause."""
    key = id(info.model) if info.model is not None else hash(info.model_id)
    with _first_gen_lock:
        if key in _first_gen_seen:
            return
        _first_gen_seen.add(key)
        if len(_first_gen_seen) > 4096:
            _first_gen_seen.clear()
    info.extra["first_generation"] = True
    if pol.get("gemma4_firstgen_disabled", hot.gemma4_firstgen_disabled):
        return
    cadence = _layer("metal_guard.cadence")
    if cadence is None or not cadence.is_gemma4_family(str(info.model_id)):
        return
    import time

    sleep_sec = float(pol.get("gemma4_firstgen_sleep_sec", hot.gemma4_firstgen_sleep_sec))
    _crumb("GEMMA4_FLUSH", str(info.model_id), sleep_sec=sleep_sec)
    cleanup = _layer("metal_guard.cleanup")
    if cleanup is not None:
        with contextlib.suppress(Exception):
            cleanup.flush_gpu()
    if sleep_sec > 0:
        time.sleep(sleep_sec)
    _crumb("GEMMA4_FLUSH_DONE", str(info.model_id))


def prefill_guard(info: Any, s: Settings) -> None:
    """R4: refuse a prompt whose prefill would pass the single-allocation ceiling."""
    prefill = _layer("metal_guard.prefill")
    if prefill is None:
        return
    dims = getattr(info.model, "_metal_guard_dims", None)
    try:
        if dims is None:
            dims = _dims_of(prefill, info)
        if dims is None:
            return
        available = _available_gb()
        prefill.require_prefill_fit(context_tokens=int(info.prompt_tokens), dims=dims,
                                    available_gb=available, settings=s)
    except Exception as exc:
        from metal_guard.errors import MetalGuardError

        if isinstance(exc, MetalGuardError):
            raise
        log.debug("prefill guard skipped: %s", exc)


_DIMS: dict[int, Any] = {}


def forget_model(model: Any) -> None:
    """A model was (re)loaded: drop per-object caches an earlier object at this id left."""
    key = id(model)
    _DIMS.pop(key, None)
    with _first_gen_lock:
        _first_gen_seen.discard(key)


def _dims_of(prefill: Any, info: Any) -> Any:
    key = id(info.model)
    if key in _DIMS:
        return _DIMS[key]
    dims = None
    args = getattr(info.model, "args", None)
    if args is not None and hasattr(args, "__dict__"):
        dims = prefill.dims_from_config(dict(vars(args)))
    if dims is None and info.model_id:
        dims = prefill.lookup_dims(info.model_id)
    if len(_DIMS) > 256:
        _DIMS.clear()
    _DIMS[key] = dims
    return dims


def _available_gb() -> float | None:
    memory = _layer("metal_guard.memory")
    if memory is None:
        return None
    stats = memory.memory_stats(load=False)
    available = getattr(stats, "available_bytes", None)
    return available / 1e9 if isinstance(available, int) else None


def translate_oom(exc: Exception, info: Any, hot: Settings) -> BaseException:
    classify = _layer("metal_guard.classify")
    if classify is None or not classify.is_metal_oom(exc):
        return exc
    from metal_guard.errors import MetalOOMError

    cls = classify.classify_mlx_error(exc)
    name = cls.name if cls else "oom"
    if hot.is_defensive:
        _crumb("OOM_RECOVERY", str(exc)[:200], site=info.site, model=info.model_id or "-", error_class=name)
        light_cleanup()
    else:
        _crumb("OBSERVE", "guard would clean up after an OOM", site=info.site, error_class=name)
    stats = None
    memory = _layer("metal_guard.memory")
    if memory is not None:
        with contextlib.suppress(Exception):
            stats = memory.memory_stats(load=False)
    return MetalOOMError(f"Metal OOM in {info.site}: {exc}", stats=stats, error_class=cls)


def publish_memory(info: Any) -> None:
    """The status heartbeat (L13), plus a ledger record after a model's first generation."""
    backend = _layer("metal_guard.backend")
    status = _layer("metal_guard.status")
    counters = backend.memory_counters(load=False) if backend is not None else None
    if counters is None:
        return
    if info.extra.get("first_generation") and info.model_id:
        _record_peak(str(info.model_id), counters.peak_bytes)
    if status is not None:
        try:
            status.publish_memory(counters, label=info.model_id, force=True)
        except Exception as exc:
            log.debug("memory heartbeat failed: %s", exc)
