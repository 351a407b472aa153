"""HTTP side of the ``mlx_lm.server`` adapter: per-server counters, error answers, status routes.

Everything here runs on the server's request threads (``ThreadingHTTPServer``) except
:class:`ServerState` updates, which either thread may make under the state's lock. Nothing
here touches MLX: the status routes read counters and the status snapshot (which never imports
MLX itself).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

STATUS_ROUTE = "/metal-guard/status"
METRICS_ROUTE = "/metrics"
#: ``Retry-After`` sent with a 503 after an OOM: the memory was released, try again soon.
OOM_RETRY_AFTER_SEC = 1
UNAVAILABLE_RETRY_AFTER_SEC = 5

COUNTERS: dict[str, str] = {
    "requests_total": "Completion requests received.",
    "responses_503_total": "Requests answered 503 by metal-guard (OOM, refused model switch, dead generation thread).",
    "oom_total": "Metal OOMs seen on the generation thread.",
    "oom_recoveries_total": "Times the batched generation loop was restarted after an OOM.",
    "model_loads_total": "Models loaded by ModelProvider (start-up included).",
    "model_switch_refused_total": "Model switches refused (cadence, fit, gate).",
    "cadence_waits_total": "Start-up loads that waited for the cadence interval.",
}


class ServerState:
    """Counters and bookkeeping of one guarded server (one ``ModelProvider``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started_at = time.time()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.inflight: list[weakref.ref[Any]] = []
        self.recoveries: collections.deque[float] = collections.deque()
        self.last_oom: dict[str, Any] | None = None
        self.generator: weakref.ref[Any] | None = None
        self.samplers_made = 0  # one per request served (test fault injection counts these)

    def bump(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def track(self, rqueue: Any) -> None:
        """Remember a request queue the generation thread took (weakly)."""
        try:
            ref = weakref.ref(rqueue)
        except TypeError:
            return
        with self.lock:
            self.inflight.append(ref)
            if len(self.inflight) > 256:
                self.inflight = [r for r in self.inflight if r() is not None]

    def take_inflight(self) -> list[Any]:
        with self.lock:
            queues = [q for q in (r() for r in self.inflight) if q is not None]
            self.inflight = []
        return queues

    def note_oom(self, exc: BaseException, where: str) -> None:
        with self.lock:
            self.counters["oom_total"] += 1
            self.last_oom = {"at": time.time(), "where": where, "error": str(exc)[:300]}

    def may_recover(self, limit: int, window_sec: float, now: float | None = None) -> bool:
        """Record a recovery unless ``limit`` already happened within ``window_sec``."""
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.recoveries and now - self.recoveries[0] > window_sec:
                self.recoveries.popleft()
            if len(self.recoveries) >= limit:
                return False
            self.recoveries.append(now)
            self.counters["oom_recoveries_total"] += 1
            return True


_STATES: weakref.WeakKeyDictionary[Any, ServerState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def state_for(provider: Any) -> ServerState:
    """The state of the server that owns ``provider`` (a ``ModelProvider``), created on demand."""
    with _STATES_LOCK:
        state = _STATES.get(provider)
        if state is None:
            state = _STATES[provider] = ServerState()
        return state


# --------------------------------------------------------------------------- errors


class Answered(BaseException):
    """Raised through ``mlx_lm.server``'s ``except Exception`` after metal-guard already
    answered the request; caught by the ``handle_completion`` wrapper."""


_local = threading.local()


def current_handler() -> Any | None:
    return getattr(_local, "handler", None)


def set_handler(handler: Any | None) -> Any | None:
    previous = getattr(_local, "handler", None)
    _local.handler = handler
    return previous


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


def unavailable(exc: BaseException) -> tuple[str, int | None] | None:
    """``(type, retry_after_sec)`` when ``exc`` means "temporarily unavailable" (HTTP 503),
    else ``None`` (mlx_lm.server answers it as before)."""
    from metal_guard.errors import (
        CadenceViolation,
        MetalGuardError,
        MLXCooldownActive,
        PanicCooldownActive,
    )

    if is_oom(exc):
        return "metal_oom", OOM_RETRY_AFTER_SEC
    if isinstance(exc, CadenceViolation):
        return "model_switch_cadence", max(1, math.ceil(exc.remaining_sec))
    if isinstance(exc, MLXCooldownActive | PanicCooldownActive):
        return "panic_cooldown", max(1, math.ceil(exc.remaining_sec))
    if isinstance(exc, MetalGuardError):
        return _snake(type(exc).__name__), None
    if isinstance(exc, RuntimeError) and str(exc) == "generation thread died":
        return "generation_unavailable", UNAVAILABLE_RETRY_AFTER_SEC
    return None


def error_payload(exc: BaseException, kind: str, retry_after: int | None) -> dict[str, Any]:
    # "error" stays a string, as in mlx_lm.server's own error answers.
    payload: dict[str, Any] = {"error": str(exc) or type(exc).__name__, "type": kind}
    if retry_after is not None:
        payload["retry_after_sec"] = retry_after
    return payload


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


def answer_unavailable(handler: Any, exc: BaseException, kind: str, retry_after: int | None,
                       *, midstream: bool) -> None:
    """Answer 503 with a JSON error; in the middle of an SSE stream (the 200 is already on the
    wire) send the error as a last ``data:`` event instead."""
    payload = error_payload(exc, kind, retry_after)
    try:
        if midstream:
            handler.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            handler.wfile.write(b"data: [DONE]\n\n")
            handler.wfile.flush()
        else:
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            send_body(handler, 503, json.dumps(payload).encode(), "application/json", headers)
    except OSError as err:  # the client went away
        log.debug("could not send the 503 answer: %s", err)
    provider = _provider_of(handler)
    if provider is not None:
        state_for(provider).bump("responses_503_total")
    log.warning("mlx_lm.server request answered 503 (%s): %s", kind, str(exc)[:200])


def _provider_of(handler: Any) -> Any | None:
    generator = getattr(handler, "response_generator", None)
    return getattr(generator, "model_provider", None)


# --------------------------------------------------------------------------- status routes


def server_section(handler: Any) -> dict[str, Any]:
    generator = getattr(handler, "response_generator", None)
    provider = _provider_of(handler)
    out: dict[str, Any] = {"generation_alive": None, "model": None, "prompt_cache_bytes": None,
                           "prompt_cache_entries": None, "prompt_cache_max_bytes": None}
    if generator is not None:
        try:
            out["generation_alive"] = bool(generator.generation_available())
        except Exception:
            out["generation_alive"] = None
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
        out["model"] = key[0] if isinstance(key, tuple) and key else None
        state = state_for(provider)
        with state.lock:
            out.update(state.counters)
            out["last_oom"] = dict(state.last_oom) if state.last_oom else None
            out["uptime_sec"] = round(time.time() - state.started_at, 3)
    return out


def status_payload(handler: Any) -> dict[str, Any]:
    from metal_guard.installer import adapter_report
    from metal_guard.status import get_status_snapshot, snapshot_health

    snap = get_status_snapshot()
    code, label = snapshot_health(snap)
    snap["health"] = {"exit_code": code, "label": label}
    snap["server"] = server_section(handler)
    report = adapter_report()
    snap["adapters"] = {name: row["state"] for name, row in report["adapters"].items()}
    return snap


def metrics_text(handler: Any) -> str:
    from metal_guard.status import get_status_snapshot
    from metal_guard.status_prom import render_prometheus

    text = render_prometheus(get_status_snapshot())
    section = server_section(handler)
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: Any) -> None:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            return
        lines.extend((f"# HELP metal_guard_server_{name} {help_text}",
                      f"# TYPE metal_guard_server_{name} {kind}",
                      f"metal_guard_server_{name} {value}"))

    for name, help_text in COUNTERS.items():
        metric(name, "counter", help_text, section.get(name))
    metric("generation_up", "gauge", "1 while the generation thread serves requests.",
           section.get("generation_alive"))
    metric("prompt_cache_bytes", "gauge", "Bytes held by the prompt cache.", section.get("prompt_cache_bytes"))
    metric("prompt_cache_entries", "gauge", "Entries in the prompt cache.", section.get("prompt_cache_entries"))
    if not text.endswith("\n"):
        text += "\n"
    return text + "\n".join(lines) + ("\n" if lines else "")


def serve_route(handler: Any, path: str) -> bool:
    """Answer a metal-guard GET route; ``False`` if ``path`` is not one of ours."""
    try:
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
        body = json.dumps({"error": f"{type(exc).__name__}: {exc}", "type": "metal_guard_status"}).encode()
        try:
            send_body(handler, 500, body, "application/json")
        except OSError:
            pass
        return True
    return False
