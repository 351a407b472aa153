"""Adapter for ``mlx_vlm.server`` (0.7, FastAPI): status route and 503 on OOM where it can.

``mlx_vlm.server`` is a FastAPI application (``mlx_vlm.server.app:app``) served by uvicorn, with
a continuous-batching generation thread (``ResponseGenerator``). Its structure allows part of
the ``mlx_lm.server`` treatment:

==============================================  ================================================
what                                            how
==============================================  ================================================
``GET /metal-guard/status``                     a route added to the app when
                                                ``mlx_vlm.server.app`` is imported (status
                                                snapshot, health, adapter states, counters)
``GET /metal-guard/metrics``                    Prometheus text (``/metrics`` is mlx_vlm's own)
503 on OOM                                      mlx_vlm answers every generation failure with
                                                ``HTTPException(500, "Generation failed: ...")``
                                                raised while handling the original error; an
                                                exception handler answers **503** with
                                                ``Retry-After`` and ``{"error", "type",
                                                "retry_after_sec"}`` when that original error is
                                                a Metal OOM or a metal-guard refusal
``ResponseGenerator._run`` (its generation      the thread clears its MLX streams on its way
thread, a daemon)                               out; at interpreter exit the live generators
                                                are stopped (``stop_and_join``) so the thread
                                                ends normally — mlx_vlm's lifespan never stops
                                                it, and a daemon thread that used MLX and is
                                                ended by interpreter shutdown aborts the
                                                process (rc 134), guarded or not
``ResponseGenerator._make_sampler``             test-only fault injection
                                                (``METALGUARD_TEST_SERVER_OOM_EVERY``)
==============================================  ================================================

Not covered, and reported as such (the registry row's ``limitations``, shown by
``adapter_report()`` and in the status route's ``server`` section): a failure in the middle of an SSE stream keeps mlx_vlm's own error event (the status
line was sent); the generation thread is not supervised (mlx_vlm catches and reports its own
errors per request); model switches go through ``mlx_vlm.utils.load``, guarded by the
``mlx_vlm`` adapter, without the switch-time cadence wait; the handlers are added only if the
app has not started serving yet (Starlette freezes its exception middleware on the first
request).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from types import ModuleType
from typing import Any

from metal_guard.adapters.base import Target

NAME = "mlx_vlm_server"
#: The mlx-vlm releases this adapter was written and tested for (see ``install_report``).
INSTRUMENTS = ("mlx-vlm>=0.7,<0.8",)
log = logging.getLogger("metal_guard.adapters.mlx_vlm_server")

APP_MODULE = "mlx_vlm.server.app"
GENERATION_MODULE = "mlx_vlm.server.generation"
STATUS_ROUTE = "/metal-guard/status"
METRICS_ROUTE = "/metal-guard/metrics"

_lock = threading.Lock()
_counters = {"responses_503_total": 0, "samplers_made": 0}
_installed: dict[int, dict[str, Any]] = {}  # id(app) -> what we added, for on_unpatched
_generators: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_registered = False
#: At interpreter exit, how long to wait for each live generation thread to finish.
EXIT_JOIN_SEC = 10.0


def limitations() -> list[str]:
    """What this adapter knowingly leaves unguarded (the registry row's ``limitations``)."""
    from metal_guard.installer import REGISTRY

    return list(REGISTRY[NAME].limitations)


def _bump(name: str) -> int:
    with _lock:
        _counters[name] += 1
        return _counters[name]


def _cause(exc: BaseException) -> BaseException | None:
    """The error mlx_vlm was handling when it raised ``exc`` (``__cause__`` / ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        from metal_guard.adapters import _server_http as http

        if http.unavailable(current) is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def _unavailable_response(exc: BaseException) -> Any:
    from fastapi.responses import JSONResponse

    from metal_guard.adapters import _openai_errors as oai
    from metal_guard.adapters import _server_http as http

    answer = http.answer_for(exc)
    assert answer is not None and answer.status == 503
    _bump("responses_503_total")
    retry = answer.retry_after
    headers = {"Retry-After": str(retry)} if retry is not None else None
    body = oai.error_body(str(exc), answer.type, answer.code, answer.param)
    return JSONResponse(body, status_code=503, headers=headers)


async def _http_exception_handler(request: Any, exc: Any) -> Any:
    from fastapi.exception_handlers import http_exception_handler

    if getattr(exc, "status_code", None) == 500:
        cause = _cause(exc)
        if cause is not None:
            return _unavailable_response(cause)
    return await http_exception_handler(request, exc)


async def _guard_error_handler(request: Any, exc: Exception) -> Any:
    return _unavailable_response(exc)


def _status_payload() -> dict[str, Any]:
    from metal_guard.installer import adapter_report
    from metal_guard.status import get_status_snapshot, snapshot_health

    snap = get_status_snapshot()
    code, label = snapshot_health(snap)
    snap["health"] = {"exit_code": code, "label": label}
    with _lock:
        counters = dict(_counters)
    snap["server"] = {"kind": "mlx_vlm.server", **counters, "limitations": limitations()}
    snap["adapters"] = {name: row["state"] for name, row in adapter_report()["adapters"].items()}
    return snap


async def _status_route() -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(_status_payload())


async def _metrics_route() -> Any:
    from fastapi.responses import PlainTextResponse

    from metal_guard.status import get_status_snapshot
    from metal_guard.status_prom import render_prometheus

    return PlainTextResponse(render_prometheus(get_status_snapshot()),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


def _extend_app(app: Any) -> list[str]:
    """Add our routes and handlers to ``app``; returns what could not be added."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from metal_guard.errors import MetalGuardError

    missing: list[str] = []
    added: dict[str, Any] = {"routes": [], "handlers": {}}
    for path, endpoint in ((STATUS_ROUTE, _status_route), (METRICS_ROUTE, _metrics_route)):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
        added["routes"].append(app.router.routes[-1])
    if getattr(app, "middleware_stack", None) is not None:
        missing.append("503 on OOM (the app was already serving when metal-guard was installed)")
    else:
        for key, handler in ((StarletteHTTPException, _http_exception_handler),
                             (MetalGuardError, _guard_error_handler)):
            added["handlers"][key] = app.exception_handlers.get(key)
            app.add_exception_handler(key, handler)
    _installed[id(app)] = {"app": app, **added}
    return missing


def on_patched(module: ModuleType) -> None:
    if module.__name__ != APP_MODULE and getattr(module.__spec__, "name", None) != APP_MODULE:
        return
    app = getattr(module, "app", None)
    if app is None or id(app) in _installed or not hasattr(app, "add_api_route"):
        return
    try:
        missing = _extend_app(app)
    except Exception as exc:
        log.warning("mlx_vlm.server: could not add the metal-guard routes: %s", exc)
        return
    for item in missing:
        log.warning("mlx_vlm.server: not guarded: %s", item)


def on_unpatched() -> None:
    for entry in list(_installed.values()):
        app = entry["app"]
        routes = app.router.routes
        for route in entry["routes"]:
            if route in routes:
                routes.remove(route)
        for key, previous in entry["handlers"].items():
            if previous is None:
                app.exception_handlers.pop(key, None)
            else:
                app.exception_handlers[key] = previous
    _installed.clear()


def _generation_thread(wrapped: Any, generator: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``ResponseGenerator._run``: remember the generator, clear the thread's streams at its end."""
    from metal_guard.threads import clearing_streams

    global _atexit_registered
    _generators.add(generator)
    with _lock:
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_stop_generators)
    return clearing_streams(wrapped)(*args, **kwargs)


def _stop_generators() -> None:
    """atexit: end every live generation thread normally (it clears its streams on the way)."""
    for generator in list(_generators):
        stop = getattr(generator, "stop_and_join", None)
        if stop is None:
            continue
        try:
            stop(timeout=EXIT_JOIN_SEC)
        except Exception as exc:
            log.debug("stopping an mlx_vlm generation thread failed: %s", exc)


def _fault_sampler(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Test-only: with ``METALGUARD_TEST_SERVER_OOM_EVERY=N`` every N-th request's sampler
    raises MLX's Metal OOM error from inside the generation step."""
    from metal_guard.adapters.mlx_lm_server import SIMULATED_OOM
    from metal_guard.policy import hot_settings
    from metal_guard.testing import server_oom_every

    sampler = wrapped(*args, **kwargs)
    every = server_oom_every(hot_settings())
    if not every or _bump("samplers_made") % every:
        return sampler

    def failing_sampler(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(SIMULATED_OOM)

    log.warning("METALGUARD_TEST_SERVER_OOM_EVERY=%d: simulating a Metal OOM for this request", every)
    return failing_sampler


TARGETS: tuple[Target, ...] = (
    Target(GENERATION_MODULE, "ResponseGenerator._run", "step", wrapper=_generation_thread,
           required=False),
    Target(GENERATION_MODULE, "ResponseGenerator._make_sampler", "step", wrapper=_fault_sampler,
           required=False),
)
