"""HTTP side of the ``mlx_lm.server`` adapter: error answers, ``/health``, status and metrics.

Runs on the server's request threads (``ThreadingHTTPServer``). Nothing here touches MLX: the
routes read counters, this process's MLX counters only if MLX is already imported, and the
status snapshot (which never imports MLX). Every error metal-guard answers is OpenAI-shaped
(:mod:`._openai_errors`): ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from metal_guard.adapters import _openai_errors as oai
from metal_guard.adapters._server_state import COUNTERS, ServerState, state_for

log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

__all__ = ["COUNTERS", "ServerState", "state_for"]

STATUS_ROUTE = "/metal-guard/status"
METRICS_ROUTE = "/metrics"
HEALTH_ROUTE = "/health"
#: ``Retry-After`` sent with a 503 after an OOM: the memory was released, try again soon.
OOM_RETRY_AFTER_SEC = 1
UNAVAILABLE_RETRY_AFTER_SEC = 5


class Answered(BaseException):
    """Raised through ``mlx_lm.server``'s ``except Exception`` after metal-guard already
    answered the request; caught by the ``handle_completion`` wrapper."""


class NotReady(Exception):
    """The server cannot take requests now (start-up wait, gave up)."""

    def __init__(self, reason: str, retry_after: int | None, phase: str) -> None:
        self.reason = reason
        self.retry_after = retry_after
        text = {"waiting": "is waiting before it loads its model",
                "gave_up": "has stopped generating and is shutting down",
                "starting": "is loading its model"}.get(phase, "is not ready")
        retry = f"; retry after {retry_after} s" if retry_after else ""
        super().__init__(f"The server {text} ({reason}){retry}.")


_local = threading.local()


def current_handler() -> Any | None:
    return getattr(_local, "handler", None)


def set_handler(handler: Any | None) -> Any | None:
    previous = getattr(_local, "handler", None)
    _local.handler = handler
    return previous


# --------------------------------------------------------------------------- classification


def is_oom(exc: BaseException) -> bool:
    from metal_guard.errors import MetalOOMError

    if isinstance(exc, MetalOOMError):
        return True
    try:
        from metal_guard.classify import is_metal_oom

        return bool(is_metal_oom(exc))
    except Exception:  # the classifier must never turn a request into a crash
        return False


def _snake(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out.removesuffix("_error")


@dataclass(frozen=True)
class Answer:
    """How metal-guard answers an error: HTTP status, OpenAI ``type`` / ``code`` / ``param``."""

    status: int
    type: str
    code: str
    retry_after: int | None = None
    param: str | None = None


def _retry(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def answer_for(exc: BaseException) -> Answer | None:
    """The answer metal-guard gives for ``exc``, or ``None`` (mlx_lm.server answers as before)."""
    from metal_guard.adapters._server_switch import ModelNotFound, SwitchRecentlyFailed
    from metal_guard.errors import (
        CadenceViolation,
        MetalGuardError,
        MLXCooldownActive,
        PanicCooldownActive,
    )

    unavailable = oai.UNAVAILABLE
    if isinstance(exc, NotReady):
        return Answer(503, unavailable, exc.reason, exc.retry_after)
    if isinstance(exc, ModelNotFound):
        return Answer(404, oai.INVALID_REQUEST, "model_not_found", None, "model")
    if isinstance(exc, SwitchRecentlyFailed):
        return Answer(503, unavailable, "model_switch_failed", _retry(exc.remaining_sec), "model")
    if is_oom(exc):
        return Answer(503, unavailable, "metal_oom", OOM_RETRY_AFTER_SEC)
    if isinstance(exc, CadenceViolation):
        return Answer(503, unavailable, "model_switch_cadence", _retry(exc.remaining_sec), "model")
    if isinstance(exc, PanicCooldownActive):
        return Answer(503, unavailable, "panic_cooldown", _retry(exc.remaining_sec))
    if isinstance(exc, MLXCooldownActive):
        return Answer(503, unavailable, "breaker_open", _retry(exc.remaining_sec))
    if isinstance(exc, MetalGuardError):
        return Answer(503, unavailable, _snake(type(exc).__name__))
    if isinstance(exc, RuntimeError) and str(exc) == "generation thread died":
        return Answer(503, unavailable, "generation_unavailable", UNAVAILABLE_RETRY_AFTER_SEC)
    return None


def unavailable(exc: BaseException) -> tuple[str, int | None] | None:
    """``(code, retry_after_sec)`` when ``exc`` is answered 503, else ``None``."""
    answer = answer_for(exc)
    return (answer.code, answer.retry_after) if answer is not None and answer.status == 503 else None


# --------------------------------------------------------------------------- sending


def send_body(handler: Any, status: int, body: bytes, content_type: str,
              extra_headers: dict[str, str] | None = None) -> None:
    # A non-streamed answer buffers "200 OK" until end_headers(); drop it if it is there.
    if hasattr(handler, "_headers_buffer"):
        handler._headers_buffer = []
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    cors = getattr(handler, "_set_cors_headers", None)
    if cors is not None:
        try:
            cors()
        except Exception as exc:  # e.g. a handler built without a response generator
            log.debug("CORS headers skipped: %s", exc)
    for key, value in (extra_headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()


def send_error(handler: Any, exc: BaseException, answer: Answer, *, midstream: bool) -> None:
    """Answer with an OpenAI-shaped error; in the middle of an SSE stream (the 200 is already
    on the wire) send it as a last ``data: {"error": ...}`` event, then ``data: [DONE]``."""
    message = str(exc) or type(exc).__name__
    state = _state_of(handler)
    # Counted before the answer goes out: a client that reads the metrics right after it got the
    # answer must see it counted.
    if state is not None:
        if midstream:
            state.bump("stream_errors_total")
        elif answer.status == 503:
            state.bump("responses_503_total")
    try:
        if midstream:
            handler.wfile.write(oai.sse_error_event(message, answer.type, answer.code, answer.param))
            handler.wfile.write(b"data: [DONE]\n\n")
            handler.wfile.flush()
        else:
            headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after else {}
            send_body(handler, answer.status,
                      oai.encode_error(message, answer.type, answer.code, answer.param),
                      "application/json", headers)
    except OSError as err:  # the client went away
        log.debug("could not send the error answer: %s", err)
    log.warning("mlx_lm.server request answered %s (%s): %s",
                "with a stream error event" if midstream else answer.status, answer.code, message[:200])


def _provider_of(handler: Any) -> Any | None:
    generator = getattr(handler, "response_generator", None)
    return getattr(generator, "model_provider", None)


def _state_of(handler: Any) -> ServerState | None:
    provider = _provider_of(handler)
    return state_for(provider) if provider is not None else None


# --------------------------------------------------------------------------- routes


def _generation_alive(generator: Any) -> bool | None:
    if generator is None:
        return None
    try:
        return bool(generator.generation_available())
    except Exception:
        return None


def _own_memory() -> dict[str, int] | None:
    from metal_guard import backend

    counters = backend.memory_counters(load=False)
    if counters is None:
        return None
    return {"active_bytes": counters.active_bytes, "cache_bytes": counters.cache_bytes,
            "peak_bytes": counters.peak_bytes}


def server_section(handler: Any) -> dict[str, Any]:
    from metal_guard.adapters import _server_keepalive as keepalive
    from metal_guard.policy import hot_settings

    generator = getattr(handler, "response_generator", None)
    provider = _provider_of(handler)
    alive = _generation_alive(generator)
    out: dict[str, Any] = {"ready": alive is not False, "phase": None, "not_ready_reason": None,
                           "retry_after_sec": None, "generation_alive": alive, "model": None,
                           "model_loaded": False, "prompt_cache_bytes": None,
                           "prompt_cache_entries": None, "prompt_cache_max_bytes": None}
    cache = getattr(generator, "prompt_cache", None)
    if cache is not None:
        out["prompt_cache_bytes"] = getattr(cache, "nbytes", None)
        try:
            out["prompt_cache_entries"] = len(cache)
        except Exception:
            out["prompt_cache_entries"] = None
        cap = getattr(cache, "max_bytes", None)
        out["prompt_cache_max_bytes"] = cap if isinstance(cap, int) and cap < 1 << 62 else None
    if provider is not None:
        key = getattr(provider, "model_key", None)
        out["model"] = key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else None
        out["model_loaded"] = getattr(provider, "model", None) is not None
        state = state_for(provider)
        blocked = state.not_ready()
        out["phase"] = state.phase
        if blocked is not None:
            out["ready"] = False
            _phase, out["not_ready_reason"], out["retry_after_sec"] = blocked
        elif alive is False:
            out["not_ready_reason"] = "generation_unavailable"
        settings = hot_settings()
        with state.lock:
            counters = dict(state.counters)
            out["last_oom"] = dict(state.last_oom) if state.last_oom else None
            out["uptime_sec"] = round(time.time() - state.started_at, 3)
            out["idle_sec"] = round(max(0.0, time.monotonic() - state.last_used), 3)
            out["in_flight"] = state.active_handlers
        out.update(counters)
        out["keep_alive_sec"] = keepalive.effective_keep_alive(state)
        out["keep_alive_default_sec"] = float(settings.server_keep_alive_sec)
        out["unload_on_pressure"] = bool(settings.server_unload_on_pressure)
    out["memory"] = _own_memory()
    return out


def status_payload(handler: Any) -> dict[str, Any]:
    from metal_guard.installer import adapter_report
    from metal_guard.status import get_status_snapshot, snapshot_health

    snap = get_status_snapshot()
    snap["server"] = server_section(handler)
    code, label = snapshot_health(snap)
    snap["health"] = {"exit_code": code, "label": label}
    report = adapter_report()
    snap["adapters"] = {name: row["state"] for name, row in report["adapters"].items()}
    return snap


def metrics_text(handler: Any) -> str:
    """The snapshot's metrics with this server's section; this process's memory is in the
    label-free ``metal_guard_server_memory_*`` series (stable across restarts and model
    switches), so its per-process ``{pid, label}`` rows are left out."""
    from metal_guard.status import get_status_snapshot
    from metal_guard.status_prom import render_prometheus

    snap = get_status_snapshot()
    snap["server"] = server_section(handler)
    memory = snap.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("processes"), list):
        memory = snap["memory"] = copy.copy(memory)
        memory["processes"] = [p for p in memory["processes"]
                               if not (isinstance(p, dict) and p.get("pid") == os.getpid())]
    return render_prometheus(snap)


def serve_health(handler: Any) -> bool:
    """``GET /health`` while not ready: 503 with the reason and ``Retry-After``. ``False``
    when ready (mlx_lm.server answers as before)."""
    state = _state_of(handler)
    blocked = state.not_ready() if state is not None else None
    if blocked is None:
        return False
    phase, reason, retry = blocked
    exc = NotReady(reason, retry, phase)
    body = {"status": "loading" if phase == "starting" else "unavailable", "phase": phase,
            "reason": reason, "retry_after_sec": retry,
            **oai.error_body(str(exc), oai.UNAVAILABLE, reason)}
    headers = {"Retry-After": str(retry)} if retry else {}
    try:
        send_body(handler, 503, json.dumps(body).encode(), "application/json", headers)
    except OSError:
        pass
    return True


def serve_route(handler: Any, path: str) -> bool:
    """Answer a metal-guard GET route; ``False`` if ``path`` is not one of ours (or ``/health``
    while ready)."""
    try:
        if path == HEALTH_ROUTE:
            return serve_health(handler)
        if path == STATUS_ROUTE:
            body = json.dumps(status_payload(handler), default=str).encode()
            send_body(handler, 200, body, "application/json")
            return True
        if path == METRICS_ROUTE:
            send_body(handler, 200, metrics_text(handler).encode(),
                      "text/plain; version=0.0.4; charset=utf-8")
            return True
    except OSError:
        return True  # the client went away
    except Exception as exc:
        log.warning("metal-guard route %s failed: %s", path, exc, exc_info=True)
        if path == HEALTH_ROUTE:
            return False
        body = oai.encode_error(f"{type(exc).__name__}: {exc}", oai.SERVER_ERROR, "metal_guard_route_failed")
        try:
            send_body(handler, 500, body, "application/json")
        except OSError:
            pass
        return True
    return False
