"""Model loads of the guarded ``mlx_lm.server``: start-up, switches, reloads after an unload.

``ModelProvider._load`` runs only when a request names another model than the one loaded (or
none is loaded). The order, so that a request never costs the server the model it serves:

1. **Resolvable?** A local directory, or a repo id in the Hugging Face cache (else fetched
   *now*, as mlx-lm would, while the current model keeps its memory), with a readable
   ``config.json`` and ``*.safetensors`` weights. If not: :class:`ModelNotFound` (HTTP 404
   ``model_not_found``), nothing released, nothing recorded.
2. **A switch that failed recently** (see 5) is answered with the same error, 503 + Retry-After.
3. **Policies that need no memory figures**: panic gate, breaker, known-panic registry — and
   the load cadence. At start-up a temporary refusal (cadence, cooldown) is *waited out* with the
   server marked not ready; at request time it is a 503 + ``Retry-After`` and the current model
   keeps serving.
4. **Release** the served model and its prompt-cache entries (gc, sync, cache flush), so the
   fit check sees the freed memory; then the full load policy (gate, breaker, registry, fit,
   cadence record, lock, breadcrumbs, ledger).
5. **If that load fails**, the previous model is loaded again (this reload skips the cadence
   *check* — it restores service — but is recorded as a load) and the failed model is refused
   for ``cadence_min_interval_sec`` without touching the served model, so a client retrying a
   model that does not fit cannot make the server reload its model in a loop. A failed load is
   never recorded as a load for the cadence (the load policy rolls its record back).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from metal_guard.adapters import _server_keepalive as keepalive
from metal_guard.adapters._server_http import NotReady
from metal_guard.adapters._server_state import ServerState, reject_queued, state_for
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.policy import CallInfo

log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

MAX_CONFIG_BYTES = 4_000_000
#: A start-up wait is re-evaluated at least this often.
MAX_WAIT_SLICE_SEC = 60.0


class ModelNotFound(Exception):
    """The requested model cannot be resolved to a loadable local directory (HTTP 404)."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        super().__init__(f"The model {model[:200]!r} does not exist or cannot be loaded: {reason}")


class SwitchRecentlyFailed(Exception):
    """A switch to this model failed moments ago; not retried yet (HTTP 503 + Retry-After)."""

    def __init__(self, model: str, remaining_sec: float, message: str) -> None:
        self.remaining_sec = remaining_sec
        super().__init__(f"Loading {model[:200]!r} failed {message and '(' + message + ') '}"
                         f"and is not retried for another {remaining_sec:.0f} s; the served "
                         f"model is unchanged")


class ServerStopping(Exception):
    """The server stopped while its start-up load was waiting."""


# --------------------------------------------------------------------------- step 1


def _read_config(directory: Path) -> str | None:
    config = directory / "config.json"
    try:
        if not config.is_file():
            return "no config.json"
        if config.stat().st_size > MAX_CONFIG_BYTES:
            return "config.json is implausibly large"
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json unreadable ({type(exc).__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        return "config.json has no model_type"
    if not any(directory.glob("*.safetensors")):
        return "no *.safetensors weights"
    return None


def loadability(model_path: str) -> str | None:
    """``None`` when ``model_path`` resolves to a directory mlx-lm can load, else why not."""
    if not isinstance(model_path, str) or not model_path or "\x00" in model_path or len(model_path) > 4096:
        return "not a model path or repo id"
    local = Path(model_path).expanduser()
    if local.exists():  # mlx-lm's own test: an existing path is never looked up on the Hub
        return _read_config(local) if local.is_dir() else "not a directory"
    utils = sys.modules.get("mlx_lm.utils")
    if utils is None:
        return None  # cannot tell without mlx-lm's resolver; let the load decide
    try:
        directory = Path(utils.hf_repo_to_path(model_path))
    except Exception:
        try:  # not cached: fetch it now, while the served model keeps running
            directory = Path(utils._download(model_path))
        except Exception as exc:
            return f"not a local directory and not on the Hugging Face Hub ({type(exc).__name__})"
    return _read_config(directory)


# --------------------------------------------------------------------------- step 3


def _temporary(exc: BaseException) -> tuple[str, float] | None:
    """``(reason, seconds)`` for a refusal that ends by itself, else ``None``."""
    from metal_guard.errors import CadenceViolation, MLXCooldownActive, PanicCooldownActive

    if isinstance(exc, CadenceViolation):
        return "model_load_cadence", exc.remaining_sec
    if isinstance(exc, PanicCooldownActive):
        return "panic_cooldown", exc.remaining_sec
    if isinstance(exc, MLXCooldownActive):
        return "breaker_open", exc.remaining_sec
    return None


def preflight(model_id: str, info: CallInfo) -> None:
    """Gate, breaker, registry and cadence *checks* (nothing recorded, nothing released)."""
    from metal_guard import _policy_steps as steps
    from metal_guard.policy import current_policy, settings_for_call

    settings = settings_for_call()
    if not settings.is_defensive:
        return  # observer mode: the load policy itself records what it would refuse
    steps.before_load(model_id, info, current_policy(), settings.replace(fit_check=False, cadence=False))
    if not settings.cadence:
        return
    from metal_guard.cadence import CadenceGuard

    CadenceGuard(min_interval_sec=settings.cadence_min_interval_sec,
                 cross_model_interval_sec=settings.cross_model_interval_sec).check(model_id)


def _sleep(seconds: float, state: ServerState) -> None:
    """Sleep out a start-up wait; every slice, requests that were queued meanwhile (a client
    that saw the server ``starting`` a moment before the wait began) are answered 503 +
    ``Retry-After`` like the ones refused at the door — none waits for the load."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        generator = _generator_of(state)
        if generator is not None and getattr(generator, "_stop", False):
            raise ServerStopping("the server is stopping")
        blocked = state.not_ready()
        if blocked is not None and blocked[0] == "waiting":
            reject_queued(generator, lambda b=blocked: NotReady(b[1], b[2], b[0]))
        time.sleep(min(0.25, left))


def wait_until_allowed(model_id: str, info: CallInfo, state: ServerState) -> None:
    """Start-up: wait out temporary refusals, marked not ready (503 + Retry-After meanwhile)."""
    while True:
        try:
            preflight(model_id, info)
            return
        except Exception as exc:
            verdict = _temporary(exc)
            if verdict is None:
                raise
            reason, seconds = verdict
            seconds = max(0.5, seconds)
            state.bump("cadence_waits_total")
            state.set_phase("waiting", reason, seconds)
            log.warning("mlx_lm.server: start-up load of %s must wait %.1f s (%s); not ready "
                        "until then", model_id, seconds, exc)
            _crumb("SERVER_STARTUP_WAIT", model_id, reason=reason, wait_sec=f"{seconds:.1f}")
            _sleep(min(seconds, MAX_WAIT_SLICE_SEC), state)
            state.set_phase("starting", "loading")


# --------------------------------------------------------------------------- steps 4-5


def restore(load: Any, provider: Any, previous: tuple[Any, ...], state: ServerState) -> None:
    """Load the previous model again after a failed switch (no cadence check; recorded)."""
    from metal_guard import policy

    model_id = os.fspath(previous[0]) if isinstance(previous[0], (str, os.PathLike)) else "unknown-model"
    try:
        with policy.scope(cadence=False):
            load(provider, previous)
    except Exception as exc:
        log.error("mlx_lm.server: could not load %s again after a failed switch: %s; the next "
                  "request will try to load it", model_id, exc)
        _crumb("SERVER_RESTORE_FAILED", model_id, error=type(exc).__name__)
        return
    try:
        from metal_guard.cadence import CadenceGuard

        CadenceGuard().mark_load(model_id)
    except Exception as exc:
        log.debug("cadence record of the restore failed: %s", exc)
    _crumb("SERVER_RESTORED", model_id)
    log.warning("mlx_lm.server: the switch failed; %s is loaded and serving again", model_id)


# --------------------------------------------------------------------------- memory


def release_memory() -> None:
    """gc, wait for queued GPU work, then return MLX's buffer cache to the system."""
    from metal_guard import backend

    gc.collect()
    for step in (backend.synchronize, backend.clear_cache):
        try:
            step(load=False)
        except Exception as exc:
            log.debug("%s failed: %s", step.__name__, exc)


def drop_prompt_cache(generator: Any) -> None:
    cache = getattr(generator, "prompt_cache", None) if generator is not None else None
    if cache is not None:
        try:
            cache.trim_to(n_sequences=0)
        except Exception as exc:
            log.debug("prompt cache trim failed: %s", exc)


def _generator_of(state: ServerState) -> Any | None:
    ref = state.generator
    return ref() if ref is not None else None


# --------------------------------------------------------------------------- the load wrapper


def describe_provider_load(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    ref = args[0] if args else kwargs.get("model_path")
    model_id = os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else None
    local = None
    if model_id and Path(model_id).expanduser().is_dir():
        local = str(Path(model_id).expanduser())
    return CallInfo("mlx_lm.server:ModelProvider._load", model_id=model_id, local_path=local)


_load_guard: Any = None


def _load_policy() -> Any:
    global _load_guard
    if _load_guard is None:
        from metal_guard.adapters.base import guard_wrapper

        _load_guard = guard_wrapper("load", "call", site="mlx_lm.server:ModelProvider._load",
                                    describe=describe_provider_load, generation=None)
    return _load_guard


def _startup_load(wrapped: Any, provider: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  model_id: str, info: CallInfo, state: ServerState) -> Any:
    while True:
        wait_until_allowed(model_id, info, state)
        try:
            return _load_policy()(wrapped, provider, args, kwargs)
        except Exception as exc:
            if _temporary(exc) is None:
                raise
            # refused between the check and the load (another process loaded): wait again


def provider_load(wrapped: Any, provider: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state = state_for(provider)
    if args and isinstance(args[0], keepalive.UnloadMarker):
        keepalive.unload(provider, _generator_of(state), state, args[0].reason, drop_prompt_cache)
        return None
    info = describe_provider_load(provider, args, kwargs)
    model_id = info.model_id or "unknown-model"
    startup = state.phase in ("starting", "waiting")
    previous = getattr(provider, "model_key", None) if getattr(provider, "model", None) is not None else None

    problem = loadability(model_id) if info.model_id else None
    if problem is not None:
        if not startup:
            state.bump("model_not_found_total")
        _crumb("SERVER_MODEL_NOT_FOUND", model_id[:200], reason=problem)
        raise ModelNotFound(model_id, problem)
    if startup:
        result = _startup_load(wrapped, provider, args, kwargs, model_id, info, state)
    else:
        failed = state.failed_switch(model_id)
        if failed is not None:
            raise SwitchRecentlyFailed(model_id, failed[0], failed[1])
        try:
            preflight(model_id, info)
        except Exception:
            state.bump("model_switch_refused_total")
            raise
        if previous is not None:
            # Release the served model first, so the fit check sees the memory it frees.
            _crumb("SERVER_SWITCH", model_id, previous=str(previous[0])[:200])
            provider.reset()
            drop_prompt_cache(_generator_of(state))
            release_memory()
        try:
            result = _load_policy()(wrapped, provider, args, kwargs)
        except Exception as exc:
            if previous is None:
                state.bump("model_switch_refused_total")
                raise
            state.bump("model_switch_failed_total")
            state.remember_failed_switch(model_id, f"{type(exc).__name__}: {exc}",
                                         _failed_switch_hold_sec(model_id, str(previous[0])))
            provider.reset()
            release_memory()
            restore(lambda p, key: _load_policy()(wrapped, p, key, {}), provider, previous, state)
            if getattr(provider, "model", None) is not None:
                _loaded(provider, state, str(previous[0]))
            raise
    _loaded(provider, state, model_id)
    return result


def _loaded(provider: Any, state: ServerState, model_id: str) -> None:
    state.bump("model_loads_total")
    state.mark_used()
    model = getattr(provider, "model", None)
    if model is not None:
        from metal_guard import _policy_steps, policy

        _policy_steps.forget_model(model)
        policy.remember_model(model, model_id)


def _failed_switch_hold_sec(model_id: str, previous_id: str) -> float:
    """How long a failed switch to ``model_id`` is answered 503 instead of retried: the larger of
    the cadence intervals of that model and of the served model it cost a release and a reload
    (risk-scaled, or the setting; 0 when cadence is off)."""
    from metal_guard.policy import settings_for_call

    s = settings_for_call()
    if not s.cadence:
        return 0.0
    try:
        from metal_guard.cadence import CadenceGuard

        guard = CadenceGuard(settings=s)
        return float(max(guard.interval_for(model_id).seconds,
                         guard.interval_for(previous_id).seconds))
    except Exception as exc:  # an unreadable state dir must not turn a 503 into a 500
        log.warning("cadence interval for %s unknown (%s); holding the failed switch 180 s",
                    model_id, exc)
        return 180.0
