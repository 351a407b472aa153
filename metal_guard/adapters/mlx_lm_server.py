"""Adapter for ``mlx_lm.server`` (0.32): model switches, 503 on OOM, status routes, cache cap.

``mlx_lm.server`` runs a ``ThreadingHTTPServer`` (one thread per request) and **one generation
thread** that loads models and does all MLX work. Unguarded, a Metal OOM answers HTTP 404 on the
sequential path and kills the generation thread on the batched path (every later request then
fails and ``/health`` says 503). With this adapter:

=================================================  ==============================================
site                                               what metal-guard does
=================================================  ==============================================
``ModelProvider._load`` (called by ``load`` only   cadence before a switch (start-up waits it out,
when the requested model changes)                  a request-time switch is refused with 503 +
                                                   ``Retry-After`` and the current model keeps
                                                   serving); the previous model and its prompt-cache
                                                   entries are released (gc, sync, cache flush)
                                                   *before* the fit check; then the load policy
                                                   (gate, breaker, registry, fit, cadence record,
                                                   lock, breadcrumbs, ledger)
``ResponseGenerator._generate``                    supervisor: an OOM that escapes the batched loop
                                                   fails the in-flight requests with 503, releases
                                                   memory and restarts the loop (at most
                                                   :data:`MAX_RECOVERIES` per minute; after that the
                                                   thread dies as before); applies the prompt-cache
                                                   byte cap (``prompt_cache_max_bytes``) to every path
``ResponseGenerator._next_request``                tracks the requests the generation thread took
``ResponseGenerator._serve_single``                after an OOM on the sequential path: drops the
                                                   prompt cache and flushes MLX's buffer cache
``ResponseGenerator.generate`` /                   an OOM (or a refused switch, or a dead generation
``APIHandler.handle_completion``                   thread) answers **503** with a JSON error
                                                   ``{"error", "type", "retry_after_sec"}``; in the
                                                   middle of an SSE stream, a final ``data:`` event
``APIHandler.do_GET``                              ``GET /metal-guard/status`` (snapshot JSON plus a
                                                   ``server`` section) and ``GET /metrics``
                                                   (Prometheus text)
``_make_sampler``                                  test-only fault injection
                                                   (``METALGUARD_TEST_SERVER_OOM_EVERY``)
=================================================  ==============================================

Generation itself (``stream_generate``, ``BatchGenerator.next``) is guarded by the ``mlx_lm``
adapter through the server's own aliases. The HTTP side lives in :mod:`._server_http`.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from metal_guard.adapters import _server_http as http
from metal_guard.adapters.base import Target
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.policy import CallInfo

NAME = "mlx_lm_server"
INSTRUMENTS = ("mlx-lm>=0.32,<0.33",)  # TODO(lead, issue 16 part 2): version range; keep in step with adapters/mlx_lm.py
log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

#: At most this many OOM restarts of the batched loop within :data:`RECOVERY_WINDOW_SEC`.
MAX_RECOVERIES = 10
RECOVERY_WINDOW_SEC = 60.0
#: What the test fault raises: the exact MLX 0.32 text of a Metal command-buffer OOM.
SIMULATED_OOM = ("[METAL] Command buffer execution failed: Insufficient Memory "
                 "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")

#: The generation thread's server state (set by the ``_generate`` supervisor).
_thread = threading.local()



def _release_memory() -> None:
    """gc, wait for queued GPU work, then return MLX's buffer cache to the system."""
    from metal_guard import backend

    gc.collect()
    for step in (backend.synchronize, backend.clear_cache):
        try:
            step(load=False)
        except Exception as exc:
            log.debug("%s failed: %s", step.__name__, exc)


def _drop_prompt_cache(generator: Any) -> None:
    cache = getattr(generator, "prompt_cache", None) if generator is not None else None
    if cache is not None:
        try:
            cache.trim_to(n_sequences=0)
        except Exception as exc:
            log.debug("prompt cache trim failed: %s", exc)


def _generator_of(provider: Any) -> Any | None:
    ref = http.state_for(provider).generator
    return ref() if ref is not None else None


# --------------------------------------------------------------------------- model switches


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


def _cadence_before_switch(model_id: str, startup: bool, state: http.ServerState) -> None:
    """Start-up waits out the cadence (a crash-looping server must not reload at once); a
    switch at request time is refused (503 + Retry-After) and the current model keeps serving."""
    from metal_guard.policy import settings_for_call

    settings = settings_for_call()
    if not (settings.cadence and settings.is_defensive):
        return  # observer mode: the load policy records what it would refuse
    from metal_guard.cadence import CadenceGuard

    guard = CadenceGuard(min_interval_sec=settings.cadence_min_interval_sec,
                         cross_model_interval_sec=settings.cross_model_interval_sec)
    if not startup:
        try:
            guard.check(model_id)
        except Exception:
            state.bump("model_switch_refused_total")
            raise
        return
    wait = guard.seconds_until_clear(model_id)
    if wait > 0:
        state.bump("cadence_waits_total")
        log.warning("mlx_lm.server: %s was loaded recently; waiting %.1f s for the load cadence",
                    model_id, wait)
        _crumb("SERVER_CADENCE_WAIT", model_id, wait_sec=f"{wait:.1f}")
        time.sleep(wait)


def _provider_load(wrapped: Any, provider: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    info = describe_provider_load(provider, args, kwargs)
    model_id = info.model_id or "unknown-model"
    state = http.state_for(provider)
    previous = getattr(provider, "model_key", None)
    startup = state.counters["model_loads_total"] == 0
    _cadence_before_switch(model_id, startup, state)
    if getattr(provider, "model", None) is not None:
        # Release the previous model first, so the fit check sees the memory it frees.
        _crumb("SERVER_SWITCH", model_id, previous=previous[0] if previous else "-")
        provider.reset()
        _drop_prompt_cache(_generator_of(provider))
        _release_memory()
    try:
        result = _load_policy()(wrapped, provider, args, kwargs)
    except Exception:
        if not startup:
            state.bump("model_switch_refused_total")
        raise
    state.bump("model_loads_total")
    model = getattr(provider, "model", None)
    if model is not None:
        from metal_guard import _policy_steps, policy

        _policy_steps.forget_model(model)
        policy.remember_model(model, model_id)
    return result


# --------------------------------------------------------------------------- generation thread


def _apply_prompt_cache_cap(generator: Any) -> None:
    from metal_guard.policy import hot_settings

    cap = hot_settings().prompt_cache_max_bytes
    cache = getattr(generator, "prompt_cache", None)
    if not cap or cache is None or not hasattr(cache, "max_bytes"):
        return
    cache.max_bytes = min(int(cache.max_bytes), int(cap))  # enforced by every insert_cache()
    cache.trim_to(n_bytes=cache.max_bytes)
    log.info("mlx_lm.server prompt cache capped at %d bytes", cache.max_bytes)


def _public_error(exc: BaseException) -> BaseException:
    """A traceback-free OOM error for the waiting requests (the original's frames hold the
    dead batch's KV caches)."""
    from metal_guard.errors import MetalOOMError

    return MetalOOMError(f"Metal OOM while generating; the request was dropped and memory released: "
                         f"{str(exc)[:300]}",
                         error_class=getattr(exc, "error_class", None))


def _recover(generator: Any, state: http.ServerState, exc: BaseException) -> None:
    error = _public_error(exc)
    queues = state.take_inflight()
    for queue in queues:
        try:
            queue.put(error)
        except Exception as err:
            log.debug("could not fail a request: %s", err)
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    _drop_prompt_cache(generator)
    _release_memory()
    _crumb("SERVER_OOM_RECOVERED", str(exc)[:200], failed_requests=len(queues))
    log.warning("mlx_lm.server: Metal OOM in the batched generation loop; %d request(s) answered "
                "503, memory released, generation loop restarted", len(queues))


def _supervise_generate(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import weakref

    provider = getattr(generator, "model_provider", None)
    if provider is None:
        return wrapped(*args, **kwargs)
    state = http.state_for(provider)
    state.generator = weakref.ref(generator)
    _thread.state = state
    try:
        _apply_prompt_cache_cap(generator)
    except Exception as exc:
        log.warning("could not cap the prompt cache: %s", exc)
    while True:
        try:
            return wrapped(*args, **kwargs)
        except Exception as exc:
            if not http.is_oom(exc) or getattr(generator, "_stop", False):
                raise
            state.note_oom(exc, "batched")
            if not state.may_recover(MAX_RECOVERIES, RECOVERY_WINDOW_SEC):
                log.error("mlx_lm.server: %d OOM recoveries within %.0f s; giving up (the "
                          "generation thread stops, /health answers 503)", MAX_RECOVERIES,
                          RECOVERY_WINDOW_SEC)
                raise
            _recover(generator, state, exc)


def _next_request(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    request = wrapped(*args, **kwargs)
    if request is not None:
        provider = getattr(generator, "model_provider", None)
        if provider is not None:
            http.state_for(provider).track(request[0])
    return request


class _WatchedQueue:
    """Stands in for a request's queue inside ``_serve_single`` and notes an OOM put into it."""

    __slots__ = ("failure", "queue")

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.failure: BaseException | None = None

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(item, BaseException) and http.is_oom(item):
            self.failure = item
            if item.__traceback__ is not None:  # free the finished generation frames now
                traceback.clear_frames(item.__traceback__)
        self.queue.put(item, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


def _serve_single(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args or not isinstance(args[0], tuple) or not args[0]:
        return wrapped(*args, **kwargs)
    watched = _WatchedQueue(args[0][0])
    result = wrapped((watched, *args[0][1:]), *args[1:], **kwargs)
    if watched.failure is not None:
        provider = getattr(generator, "model_provider", None)
        if provider is not None:
            http.state_for(provider).note_oom(watched.failure, "sequential")
        _drop_prompt_cache(generator)
        _release_memory()
        _crumb("SERVER_OOM_RELEASED", str(watched.failure)[:200], path="sequential")
    return result


def _fault_sampler(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Test-only: with ``METALGUARD_TEST_SERVER_OOM_EVERY=N`` every N-th request's sampler
    raises MLX's Metal OOM error from inside the generation step."""
    from metal_guard.policy import hot_settings

    sampler = wrapped(*args, **kwargs)
    every = hot_settings().test_server_oom_every
    state: http.ServerState | None = getattr(_thread, "state", None)
    if not every or state is None:
        return sampler
    with state.lock:
        state.samplers_made += 1
        number = state.samplers_made
    if number % every:
        return sampler

    def failing_sampler(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(SIMULATED_OOM)

    log.warning("METALGUARD_TEST_SERVER_OOM_EVERY=%d: simulating a Metal OOM for this request", every)
    return failing_sampler


# --------------------------------------------------------------------------- HTTP threads


def _client_generate(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    provider = getattr(generator, "model_provider", None)
    if provider is not None:
        http.state_for(provider).bump("requests_total")
    try:
        return wrapped(*args, **kwargs)
    except Exception as exc:
        handler = http.current_handler()
        verdict = http.unavailable(exc)
        if handler is None or verdict is None:
            raise
        http.answer_unavailable(handler, exc, *verdict, midstream=False)
        raise http.Answered() from None


def _handle_completion(wrapped: Any, handler: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    previous = http.set_handler(handler)
    try:
        return wrapped(*args, **kwargs)
    except http.Answered:
        return None
    except Exception as exc:
        verdict = http.unavailable(exc)
        if verdict is None:
            raise
        http.answer_unavailable(handler, exc, *verdict, midstream=bool(getattr(handler, "stream", False)))
        return None
    finally:
        http.set_handler(previous)


def _do_get(wrapped: Any, handler: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    path = str(getattr(handler, "path", "")).split("?", 1)[0]
    if path in (http.STATUS_ROUTE, http.METRICS_ROUTE) and http.serve_route(handler, path):
        return None
    return wrapped(*args, **kwargs)


TARGETS: tuple[Target, ...] = (
    Target("mlx_lm.server", "ModelProvider._load", "load", wrapper=_provider_load),
    Target("mlx_lm.server", "ResponseGenerator._generate", "step", wrapper=_supervise_generate),
    Target("mlx_lm.server", "ResponseGenerator._next_request", "step", wrapper=_next_request),
    Target("mlx_lm.server", "ResponseGenerator._serve_single", "step", wrapper=_serve_single),
    Target("mlx_lm.server", "ResponseGenerator.generate", "generate", wrapper=_client_generate),
    Target("mlx_lm.server", "APIHandler.handle_completion", "generate", wrapper=_handle_completion),
    Target("mlx_lm.server", "APIHandler.do_GET", "step", wrapper=_do_get),
    Target("mlx_lm.server", "_make_sampler", "step", wrapper=_fault_sampler, required=False),
)
