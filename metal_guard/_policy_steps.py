"""The individual steps of :mod:`metal_guard.policy`, each calling one building block lazily.

Every step imports its layer inside the function (importing metal_guard stays free). A safety
layer that cannot be imported (a broken or partial install) is never skipped silently: in
defensive mode the call fails with :class:`~metal_guard.errors.GuardLayerError`, in observer
mode it goes through with a warning and a ``GUARD_BROKEN`` breadcrumb each time. A helper layer
(memory counters, status heartbeat, ledger ...) that cannot be imported is skipped with a
warning (once per process): it refuses nothing, so failing the user's call for it would be
worse than no guard. A check that fails unexpectedly while running is skipped with a warning.
Refusals (subclasses of :class:`~metal_guard.errors.MetalGuardError`) are raised in defensive
mode and recorded and let through in observer mode.
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
    """A helper module of this package (counters, heartbeat, ledger ...), imported on first use.

    One that cannot be imported is skipped: a warning and a ``GUARD_BROKEN`` breadcrumb, once
    per process, and ``None``. It refuses nothing, so failing the user's call would be worse.
    """
    module = _LAYERS.get(name)
    if module is not None:
        return module
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a module that fails while it executes
        if name not in _missing_logged:
            _missing_logged.add(name)
            _crumb("GUARD_BROKEN", name, error=type(exc).__name__)
            log.warning("metal-guard helper module %s cannot be imported (%s); its step is "
                        "skipped. The installation is broken: reinstall metal-guard.",
                        name, _reason(exc))
        return None
    _LAYERS[name] = module
    return module


def _guard_layer(name: str, s: Settings) -> Any | None:
    """A safety layer (gate, breaker, registry, fit, cadence, lock, prefill ...), imported on
    first use. One that cannot be imported is never a silent skip: see :func:`_broken_layer`."""
    module = _LAYERS.get(name)
    if module is not None:
        return module
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        _broken_layer(name, exc, s.mode)
        return None
    _LAYERS[name] = module
    return module


def _broken_layer(name: str, exc: BaseException, mode: str) -> None:
    """A safety layer cannot run because a module of this package cannot be imported.

    Defensive mode raises :class:`~metal_guard.errors.GuardLayerError`; observer mode lets the
    call through with a warning. Both leave a ``GUARD_BROKEN`` breadcrumb, on every call.
    """
    _crumb("GUARD_BROKEN", name, error=type(exc).__name__, mode=mode)
    if mode == "defensive":
        from metal_guard.errors import GuardLayerError

        raise GuardLayerError(name, _reason(exc)) from exc
    log.warning("observer mode: metal-guard safety layer %s cannot be imported (%s); this call "
                "goes through without it. The installation is broken: reinstall metal-guard.",
                name, _reason(exc))


def _own_module(exc: ImportError) -> str | None:
    """The name of the module of this package whose import failed, if that is what ``exc`` is."""
    name = exc.name or ""
    return name if name == "metal_guard" or name.startswith("metal_guard.") else None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _step(name: str, fn: Callable[[], Any], mode: str, model_id: str) -> Any:
    """Run one check: refusals raise (defensive) or are recorded (observer); a module of this
    package that the check cannot import is a broken layer (:func:`_broken_layer`); other bugs
    are logged and the check is skipped."""
    from metal_guard.errors import MetalGuardError

    try:
        return fn()
    except MetalGuardError as exc:
        if mode == "defensive":
            raise
        _crumb("OBSERVE", f"{name} would refuse: {exc}"[:300], model=model_id, error=type(exc).__name__)
        log.warning("observer mode: %s would refuse %s (%s); letting it through", name, model_id, exc)
        return None
    except ImportError as exc:
        broken = _own_module(exc)
        if broken is None:
            log.warning("guard step %s failed (%s); continuing without it", name, _reason(exc))
            return None
        _broken_layer(broken, exc, mode)
        return None
    except Exception as exc:
        log.warning("guard step %s failed (%s: %s); continuing without it", name, type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------- load


def before_load(model_id: str, info: Any, pol: Mapping[str, Any], s: Settings) -> None:
    """Gate, breaker, registry, fit, cadence — in that order (cheapest refusal first, cadence
    last because it records the load)."""
    mode = s.mode
    migrate = _guard_layer("metal_guard.migrate", s)
    if migrate is not None:  # a metal-guard 0.11 cooldown / breaker / recent load is honoured
        migrate.ensure_imported(s)
    if not s.panic_gate_disabled:  # gate=False / METALGUARD_PANIC_GATE_DISABLED=1
        gate = _guard_layer("metal_guard.forensics.gate", s)
        if gate is not None:
            _step("panic gate", lambda: _gate(gate, s), mode, model_id)
    if pol.get("breaker", True):
        breaker = _guard_layer("metal_guard.breaker", s)
        if breaker is not None:
            _step("circuit breaker", lambda: breaker.CircuitBreaker().check(), mode, model_id)
    if pol.get("registry", True):
        registry = _guard_layer("metal_guard.knowledge.registry", s)
        if registry is not None:
            _step("known-panic registry", lambda: registry.enforce_known_panic_policy(
                model_id, allow=s.allow_panic_models, settings=s), mode, model_id)
    if s.fit_check:
        memory = _guard_layer("metal_guard.memory", s)
        if memory is not None:
            # an unknown size follows the one rule of require_fit(): loud at the default
            # levels, refused at strict (docs/memory.md)
            _step("fit check", lambda: memory.require_fit(
                model_name=info.local_path or model_id, settings=s,
                cleanup=light_cleanup), mode, model_id)
    if s.cadence:
        cadence = _guard_layer("metal_guard.cadence", s)
        if cadence is not None:
            def check_and_mark() -> None:
                previous = cadence.CadenceGuard().last_ts(model_id)
                at = cadence.clear_for_load(model_id, model_path=info.local_path, settings=s)
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
    lock = _guard_layer("metal_guard.lock", s)
    if lock is None:
        yield
        return
    rank = None
    dist = _layer("metal_guard.distributed")
    if dist is not None:
        rank = dist.current(s)
    label = f"load {model_id}" + (f" (rank {rank.rank})" if rank is not None else "")
    # the ranks of one job share one hold: per job, not per rank (they may wait for each other)
    with lock.mlx_exclusive_lock(label[:200], job=rank.job if rank is not None else None):
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
    if not pol.get("gemma4_firstgen_flush", not hot.gemma4_firstgen_disabled):
        return
    cadence = _guard_layer("metal_guard.cadence", hot)
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
    prefill = _guard_layer("metal_guard.prefill", s)
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
        broken = _own_module(exc) if isinstance(exc, ImportError) else None
        if broken is not None:
            _broken_layer(broken, exc, s.mode)
            return
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
