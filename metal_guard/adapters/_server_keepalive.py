"""Keep-alive for the guarded ``mlx_lm.server``: unload a model nobody uses.

``METALGUARD_SERVER_KEEP_ALIVE`` (default ``-1``, never) and a request's ``"keep_alive"`` field
follow Ollama: a number of seconds or a duration (``"30s"``, ``"5m"``, ``"1h"``), ``0`` = unload
right after the request, negative = keep loaded. The value of the **last finished request**
(its own field, else the setting) decides how long the model stays loaded after it.

How the unload happens: every model object of ``mlx_lm.server`` lives on its single generation
thread (in ``ModelProvider``, the batch generator and local variables of
``ResponseGenerator._generate``). When the keep-alive expires and nothing is in flight, the
``_next_request`` wrapper hands that loop an *unload request* instead of ``None``. The loop
treats it like a request for another model: it drains and closes its batch generator, calls
``ModelProvider.load`` — whose ``_load`` wrapper releases the model, its prompt cache and MLX's
buffer cache instead of loading anything, so the loop's own ``model``/``tokenizer`` variables
are rebound to ``None`` — and passes it to ``_serve_single``, whose wrapper then releases the
memory (gc, MLX's buffer cache), now that nothing references the model, and counts the unload.
Nothing is answered (there is no client). The marker is an object a JSON body cannot produce.

With ``METALGUARD_SERVER_UNLOAD_ON_PRESSURE=1`` an idle model is also unloaded when the
machine's memory pressure is ``warn`` or ``critical`` (checked at most every
:data:`PRESSURE_CHECK_SEC` while idle).
"""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace
from typing import Any

from metal_guard.adapters._server_state import ServerState
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb

log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

PRESSURE_CHECK_SEC = 2.0
#: An idle model is unloaded under pressure only after this long without requests.
PRESSURE_MIN_IDLE_SEC = 1.0
HIGH_PRESSURE = ("warn", "critical")


class UnloadMarker(str):
    """The model path of an unload request (a JSON body only ever yields plain ``str``)."""

    reason: str

    def __new__(cls, reason: str) -> UnloadMarker:
        obj = super().__new__(cls, "metal-guard:unload")
        obj.reason = reason
        return obj


class UnloadQueue:
    """The response queue of an unload request: nobody reads it."""

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        return None


def unload_request(reason: str) -> tuple[Any, Any, Any]:
    """``(queue, request, args)`` as ``ResponseGenerator._next_request`` returns them; not
    batchable (``seed`` set), so the loop drains its batch and goes through ``load``."""
    model = SimpleNamespace(model=UnloadMarker(reason), adapter=None, draft=None)
    args = SimpleNamespace(model=model, seed=0, max_tokens=1)
    return UnloadQueue(), SimpleNamespace(messages=[]), args


def is_unload(request: Any) -> bool:
    return isinstance(request, tuple) and bool(request) and isinstance(request[0], UnloadQueue)


def parse_request_keep_alive(value: Any) -> float:
    """A request's ``keep_alive``: JSON number (seconds) or duration string; ``ValueError`` if
    invalid. Negative means never (returned as -1.0)."""
    from metal_guard.settings import duration_seconds

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("keep_alive must be a number of seconds or a duration such as "
                         "\"30s\", \"5m\", \"1h\" (0 = unload now, negative = keep loaded)")
    seconds = duration_seconds(str(value)) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds > 1e9:
        raise ValueError("keep_alive must be a finite duration of at most 1e9 seconds")
    return -1.0 if seconds < 0 else seconds


def default_keep_alive() -> float:
    from metal_guard.policy import hot_settings

    return float(hot_settings().server_keep_alive_sec)


def effective_keep_alive(state: ServerState) -> float:
    value = state.request_keep_alive
    return default_keep_alive() if value is None else value


def _idle(state: ServerState, generator: Any) -> bool:
    if state.active_handlers or state.live_requests():
        return False
    requests = getattr(generator, "requests", None)
    try:
        return requests is None or requests.empty()
    except Exception:
        return False


def due(state: ServerState, generator: Any, provider: Any) -> str | None:
    """The reason to unload now (``"keep_alive"`` / ``"memory_pressure"``), else ``None``.
    Runs on the generation thread each time it finds no request (about every 0.1 s)."""
    if getattr(provider, "model", None) is None or getattr(provider, "is_distributed", False):
        return None
    if state.gave_up or state.phase != "ready":
        return None
    now = time.monotonic()
    idle_for = now - state.last_used
    keep = effective_keep_alive(state)
    if keep >= 0 and idle_for >= keep and _idle(state, generator):
        return "keep_alive"
    if idle_for >= PRESSURE_MIN_IDLE_SEC and now >= state.next_pressure_check:
        from metal_guard.policy import hot_settings

        if not hot_settings().server_unload_on_pressure:
            return None
        state.next_pressure_check = now + PRESSURE_CHECK_SEC
        if _pressure_high(state) and _idle(state, generator):
            return "memory_pressure"
    return None


def _pressure_high(state: ServerState) -> bool:
    try:
        from metal_guard.hardware import system_memory

        return system_memory(runner=state.pressure_runner).pressure in HIGH_PRESSURE
    except Exception as exc:
        log.debug("memory pressure read failed: %s", exc)
        return False


def unload(provider: Any, generator: Any, state: ServerState, reason: str,
           drop_prompt_cache: Any) -> None:
    """First half of an unload (from the ``_load`` wrapper, on the generation thread): drop the
    served model and its prompt cache; skipped if a request came in meanwhile. The loop still
    holds the model in a local variable until ``load`` returns, so the memory is released by
    :func:`finish_unload`, called from the next step of the loop."""
    key = getattr(provider, "model_key", None)
    if getattr(provider, "model", None) is None:
        return
    if not _idle(state, generator):
        log.info("mlx_lm.server: idle unload skipped, a request arrived")
        return
    model_id = str(key[0]) if isinstance(key, tuple) and key else "unknown-model"
    idle_for = time.monotonic() - state.last_used
    provider.reset()
    drop_prompt_cache(generator)
    machines = getattr(generator, "_state_machine_cache", None)
    if isinstance(machines, dict):
        machines.clear()
    state.pending_unload = (model_id, reason, idle_for)


def finish_unload(state: ServerState, release: Any) -> None:
    """Second half, once the loop dropped its last reference to the model: gc, MLX's buffer
    cache back to the system, breadcrumb, heartbeat — and only then the counter, so whoever
    sees ``idle_unloads`` move finds all of that done."""
    pending, state.pending_unload = state.pending_unload, None
    if pending is None:
        return
    model_id, reason, idle_for = pending
    release()
    _crumb("SERVER_IDLE_UNLOAD", model_id, reason=reason, idle_sec=f"{idle_for:.1f}",
           keep_alive_sec=f"{effective_keep_alive(state):g}")
    log.info("mlx_lm.server: unloaded %s after %.1f s idle (%s); the next request loads it again",
             model_id, idle_for, reason)
    try:
        from metal_guard.policy import CallInfo, _publish

        _publish(CallInfo("mlx_lm.server:idle_unload", model_id=None), force=True)
    except Exception as exc:
        log.debug("memory heartbeat after unload failed: %s", exc)
    state.mark_used()
    state.bump("idle_unloads")
