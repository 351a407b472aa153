"""Adapter for ``mlx_lm.server`` (0.32): never worse than the plain server, honest readiness.

``mlx_lm.server`` runs a ``ThreadingHTTPServer`` (one thread per request) and **one generation
thread** that loads models and does all MLX work. Unguarded, a Metal OOM answers HTTP 404 on the
sequential path and kills the generation thread on the batched path. With this adapter:

=================================================  ==============================================
site                                               what metal-guard does
=================================================  ==============================================
``ModelProvider._load`` (only when the requested   switch order of :mod:`._server_switch`: model
model differs from the loaded one)                 resolvable, policies, *then* release, then the
                                                   load policy; a failed switch brings the previous
                                                   model back. Also performs keep-alive unloads
``ModelProvider.load_default``                     skipped when the loop restarts after an OOM
``ResponseGenerator._generate``                    supervisor: tracks requests through the
                                                   request queue (for the thread's whole life);
                                                   OOM → memory released, breadcrumb, *then*
                                                   in-flight requests get 503, loop restarted (at
                                                   most :data:`MAX_RECOVERIES` a minute); when it
                                                   cannot go on: not ready, queued and in-flight
                                                   requests answered, and the process exits with
                                                   :data:`EXIT_SERVER_GAVE_UP` if we own it
                                                   (:mod:`._server_recovery`)
``ResponseGenerator._next_request``                readiness, keep-alive expiry (request tracking
                                                   only when the queue could not be made to)
``ResponseGenerator._serve_single``                after an OOM on the sequential path: prompt
                                                   cache dropped, MLX's buffer cache flushed —
                                                   before the client gets its 503; the second
                                                   half of a keep-alive unload
``ResponseGenerator.generate``,                    not ready → 503 at once; errors → OpenAI-shaped
``APIHandler.handle_completion``                   404/503, or an SSE error event mid-stream;
                                                   the request's ``keep_alive`` field
``APIHandler.do_GET``                              ``/health`` while not ready, ``/metal-guard/
                                                   status``, ``/metrics``
``run``                                            owns the process: exit code after giving up
``_make_sampler``                                  test-only fault (``METALGUARD_TEST_SERVER_OOM_EVERY``)
=================================================  ==============================================

Generation itself (``stream_generate``, ``BatchGenerator.insert`` / ``insert_segments`` /
``next``) is guarded by the ``mlx_lm`` adapter through the server's own aliases.
"""

from __future__ import annotations

import logging
import threading
import traceback
import weakref
from typing import Any

from metal_guard.adapters import _server_http as http
from metal_guard.adapters import _server_keepalive as keepalive
from metal_guard.adapters import _server_switch as switch
from metal_guard.adapters._server_recovery import EXIT_SERVER_GAVE_UP, give_up, recover
from metal_guard.adapters._server_state import (
    ServerState,
    TrackedQueue,
    request_local,
    track_requests,
)
from metal_guard.adapters.base import Target
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb

NAME = "mlx_lm_server"
#: The mlx-lm releases this adapter was written and tested against (kept in step with mlx_lm.py).
INSTRUMENTS = ("mlx-lm>=0.32,<0.33",)
log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

#: At most this many OOM restarts of the batched loop within :data:`RECOVERY_WINDOW_SEC`.
MAX_RECOVERIES = 10
RECOVERY_WINDOW_SEC = 60.0
#: What the test fault raises: the exact MLX 0.32 text of a Metal command-buffer OOM.
SIMULATED_OOM = ("[METAL] Command buffer execution failed: Insufficient Memory "
                 "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")

#: The generation thread's server state (set by the ``_generate`` supervisor).
_thread = threading.local()


def _load_default(wrapped: Any, provider: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Skipped when the loop restarts after an OOM: the served model (which may be another
    one, or none after an idle unload) stays as it is."""
    if getattr(_thread, "restarting", False):
        return None
    return wrapped(*args, **kwargs)


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


def _supervise_generate(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    provider = getattr(generator, "model_provider", None)
    if provider is None:
        return wrapped(*args, **kwargs)
    state = http.state_for(provider)
    state.generator = weakref.ref(generator)
    state.supervised = True
    # Requests are tracked by their queue for the life of this thread (not by a wrapper that
    # install()/uninstall() can switch off while the thread is waiting for work).
    state.tracks_queue = track_requests(generator, state)
    _thread.state = state
    _thread.restarting = False
    try:
        _apply_prompt_cache_cap(generator)
    except Exception as exc:
        log.warning("could not cap the prompt cache: %s", exc)
    while True:
        try:
            return wrapped(*args, **kwargs)
        except Exception as exc:
            if getattr(generator, "_stop", False):
                raise
            if http.is_oom(exc):
                state.note_oom(exc, "batched")
                if state.may_recover(MAX_RECOVERIES, RECOVERY_WINDOW_SEC):
                    recover(generator, state, exc)
                    _thread.restarting = True
                    continue
                why = f"{MAX_RECOVERIES} OOM recoveries within {RECOVERY_WINDOW_SEC:.0f} s"
            else:
                why = f"the generation loop failed: {type(exc).__name__}: {str(exc)[:200]}"
            give_up(generator, state, exc, why)
            raise


def _next_request(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    provider = getattr(generator, "model_provider", None)
    if provider is None:
        return wrapped(*args, **kwargs)
    state = http.state_for(provider)
    if state.phase != "ready":
        state.set_phase("ready")  # start-up (load_default) is done once the loop asks for work
    if state.pending_unload is not None:  # (the _serve_single wrapper was not active)
        keepalive.finish_unload(state, switch.release_memory)
    request = wrapped(*args, **kwargs)
    if request is None:
        state.idle_polls += 1  # only this thread writes it
        if not state.active_handlers:
            reason = keepalive.due(state, generator, provider)
            if reason is not None:
                return keepalive.unload_request(reason)
        return None
    if state.tracks_queue or not isinstance(request, tuple) or not request:
        return request  # (tracked by the request queue itself)
    if isinstance(request[0], TrackedQueue):
        return request
    tracked = TrackedQueue(request[0], state)
    state.track(tracked)
    return (tracked, *request[1:])


def _state_of(generator: Any) -> ServerState:
    provider = getattr(generator, "model_provider", None)
    return http.state_for(provider) if provider is not None else ServerState()


def _serve_single(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args or not isinstance(args[0], tuple) or not args[0]:
        return wrapped(*args, **kwargs)
    if keepalive.is_unload(args[0]):
        # the load wrapper dropped the model and the loop its local reference: free the memory
        keepalive.finish_unload(_state_of(generator), switch.release_memory)
        return None  # nobody to answer
    queue = args[0][0]
    if not isinstance(queue, TrackedQueue):
        return wrapped(*args, **kwargs)
    queue.hold = True  # an error reaches the client after the cleanup below, not before it
    try:
        result = wrapped(*args, **kwargs)
        failure = queue.failure
        if failure is not None and http.is_oom(failure):
            if failure.__traceback__ is not None:  # free the finished generation frames now
                traceback.clear_frames(failure.__traceback__)
            provider = getattr(generator, "model_provider", None)
            if provider is not None:
                http.state_for(provider).note_oom(failure, "sequential")
            switch.drop_prompt_cache(generator)
            switch.release_memory()
            _crumb("SERVER_OOM_RELEASED", str(failure)[:200], path="sequential")
        return result
    finally:
        queue.release()


def _fault_sampler(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Test-only: with ``METALGUARD_TEST_SERVER_OOM_EVERY=N`` every N-th request's sampler
    raises MLX's Metal OOM error from inside the generation step."""
    from metal_guard.policy import hot_settings
    from metal_guard.testing import server_oom_every

    sampler = wrapped(*args, **kwargs)
    every = server_oom_every(hot_settings())
    state: ServerState | None = getattr(_thread, "state", None)
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
    state = http.state_for(provider) if provider is not None else None
    try:
        if state is not None:
            state.bump("requests_total")
            blocked = state.not_ready()
            if blocked is not None and blocked[0] != "starting":  # a load in progress: queue
                raise http.NotReady(blocked[1], blocked[2], blocked[0])
        return wrapped(*args, **kwargs)
    except Exception as exc:
        handler = http.current_handler()
        answer = http.answer_for(exc)
        if handler is None or answer is None:
            raise
        http.send_error(handler, exc, answer, midstream=False)
        raise http.Answered() from None


def _bad_keep_alive(handler: Any, message: str) -> None:
    from metal_guard.adapters import _openai_errors as oai

    try:
        http.send_body(handler, 400, oai.encode_error(message, oai.INVALID_REQUEST, "invalid_value",
                                                      "keep_alive"), "application/json")
    except OSError:
        pass


def _handle_completion(wrapped: Any, handler: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    body = getattr(handler, "body", None)
    keep_alive: float | None = None
    if isinstance(body, dict) and "keep_alive" in body:
        try:
            keep_alive = keepalive.parse_request_keep_alive(body["keep_alive"])
        except ValueError as exc:
            _bad_keep_alive(handler, str(exc))
            return None
    generator = getattr(handler, "response_generator", None)
    provider = getattr(generator, "model_provider", None)
    state = http.state_for(provider) if provider is not None else None
    previous = http.set_handler(handler)
    request_local.keep_alive = keep_alive  # taken by the request queue with the request
    if state is not None:
        state.begin_request()
    try:
        return wrapped(*args, **kwargs)
    except http.Answered:
        return None
    except Exception as exc:
        answer = http.answer_for(exc)
        if answer is None:
            raise
        http.send_error(handler, exc, answer, midstream=bool(getattr(handler, "stream", False)))
        return None
    finally:
        http.set_handler(previous)
        request_local.keep_alive = None
        if state is not None:
            state.end_request()
            if not state.tracks_queue:  # (requests not tracked by the queue: no better moment)
                state.request_finished(keep_alive)


def _do_get(wrapped: Any, handler: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    path = str(getattr(handler, "path", "")).split("?", 1)[0]
    if path in (http.HEALTH_ROUTE, http.STATUS_ROUTE, http.METRICS_ROUTE) and http.serve_route(handler, path):
        return None
    return wrapped(*args, **kwargs)


def _run(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``mlx_lm.server.run(host, port, model_provider)``: this process is the server, so a
    server that gave up exits with :data:`EXIT_SERVER_GAVE_UP`."""
    provider = args[2] if len(args) > 2 else kwargs.get("model_provider")
    state = http.state_for(provider) if provider is not None else None
    if state is not None:
        state.owns_process = True
    try:
        result = wrapped(*args, **kwargs)
    except KeyboardInterrupt:
        if state is None or not state.gave_up:
            raise
        result = None
    if state is not None and state.gave_up:
        raise SystemExit(EXIT_SERVER_GAVE_UP)
    return result


TARGETS: tuple[Target, ...] = (
    Target("mlx_lm.server", "ModelProvider._load", "load", wrapper=switch.provider_load),
    Target("mlx_lm.server", "ModelProvider.load_default", "step", wrapper=_load_default),
    Target("mlx_lm.server", "ResponseGenerator._generate", "step", wrapper=_supervise_generate),
    Target("mlx_lm.server", "ResponseGenerator._next_request", "step", wrapper=_next_request),
    Target("mlx_lm.server", "ResponseGenerator._serve_single", "step", wrapper=_serve_single),
    Target("mlx_lm.server", "ResponseGenerator.generate", "generate", wrapper=_client_generate),
    Target("mlx_lm.server", "APIHandler.handle_completion", "generate", wrapper=_handle_completion),
    Target("mlx_lm.server", "APIHandler.do_GET", "step", wrapper=_do_get),
    Target("mlx_lm.server", "run", "step", wrapper=_run, required=False),
    Target("mlx_lm.server", "_make_sampler", "step", wrapper=_fault_sampler, required=False),
)
