"""Forwarding one request from the front to the active child, streams included.

The body of the request is read whole (bounded) and sent to the child with its method, path
and end-to-end headers. The answer goes back unchanged except for framing:

* a non-streaming answer is read whole (bounded), then sent with ``Content-Length`` — so a
  child that dies before it finished still turns into a clean 503;
* a stream (``text/event-stream``, or an answer without a length) is relayed as it arrives:
  chunked to an HTTP/1.1 client (the connection stays open), close-delimited to HTTP/1.0.

When the child cannot be reached or dies before its answer is complete, the client gets an
OpenAI-shaped 503 with ``Retry-After``; a stream that was already running ends with one
``data: {"error": ...}`` event (and the chunked terminator), never with a reset.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from metal_guard.serve import http1, replies

if TYPE_CHECKING:  # pragma: no cover
    from metal_guard.serve.child import Child
    from metal_guard.serve.front import FrontHandler

log = logging.getLogger("metal_guard.serve.proxy")

__all__ = ["forward", "send_error"]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection", "host", "content-length",
    "expect",
})
#: A non-streaming answer larger than this is streamed through instead of buffered.
MAX_BUFFERED_BYTES = 64 << 20
CHUNK = 65536
#: How long an upstream failure waits for the supervisor to see (and classify) the death.
DEATH_WAIT_SEC = 1.0

_UPSTREAM_ERRORS = (OSError, http1.HeadError, http1.IncompleteBody)


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def send_error(handler: FrontHandler, status: int, message: str, *, code: str,
               retry_after: float | None = None, close: bool = False, **extra: Any) -> None:
    """An OpenAI-shaped JSON error answer."""
    if status == 503:
        extra.setdefault("type", replies.UNAVAILABLE)
    body = replies.error_json(message, code=code, **extra)
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    if retry_after is not None:
        handler.send_header("Retry-After", replies.retry_after_value(retry_after))
    if close:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def read_body(handler: FrontHandler, max_bytes: int) -> bytes:
    """The request body (``Content-Length`` or chunked), at most ``max_bytes``."""
    te = handler.headers.get("Transfer-Encoding", "")
    if te:
        if te.strip().lower() != "chunked":
            raise BodyError(501, f"unsupported Transfer-Encoding {te[:40]!r}")
        return _read_chunked(handler, max_bytes)
    try:
        length = http1.content_length(handler.headers)  # type: ignore[arg-type]
    except http1.HeadError as exc:
        raise BodyError(exc.status, str(exc)) from None
    if length is None:
        return b""
    if length > max_bytes:
        raise BodyError(413, f"request body of {length} bytes exceeds the limit of {max_bytes}")
    data = handler.rfile.read(length)
    if len(data) != length:
        raise BodyError(400, "request body shorter than its Content-Length")
    return data


def _read_chunked(handler: FrontHandler, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = handler.rfile.readline(1026)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BodyError(400, "malformed chunked request body") from None
        if size < 0:
            raise BodyError(400, "malformed chunked request body")
        if size == 0:
            while handler.rfile.readline(8194).strip():  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > max_bytes:
            raise BodyError(413, f"request body exceeds the limit of {max_bytes} bytes")
        data = handler.rfile.read(size)
        if len(data) != size:
            raise BodyError(400, "truncated chunked request body")
        parts.append(data)
        handler.rfile.readline(3)


def _death_message(child: Child) -> tuple[str, dict[str, Any]]:
    """What to tell a client whose request the child dropped (waits briefly for the class)."""
    child.died.wait(DEATH_WAIT_SEC)
    crash = child.crash
    if crash is None and child.died.is_set():
        # The waiter has reaped it; the supervisor may not have classified it yet.
        from metal_guard.errors import signal_name

        sig = signal_name(child.exitcode)
        return (f"the model server died ({sig or f'exit code {child.exitcode}'}); "
                "a new one is starting"), {"signal": sig}
    if crash is None:
        return "the model server stopped answering; a new one is starting", {}
    cls = crash.error_class
    return (f"the model server crashed ({cls.name if cls else crash.signal}); a new one is "
            "starting"), {"error_class": cls.name if cls else None, "signal": crash.signal}


def forward(handler: FrontHandler, child: Child, body: bytes, *, timeout: float,
            retry_after: float) -> None:
    """Send the handler's request to ``child`` and relay its answer."""
    headers = [(k, v) for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP]
    up: http1.Upstream | None = None
    try:
        try:
            up = http1.Upstream(child.port, timeout)
            up.send(handler.command, handler.path, headers, body)
            up.read_head(handler.command)
        except _UPSTREAM_ERRORS as exc:
            log.debug("upstream failed before answering: %s", exc)
            message, extra = _death_message(child)
            send_error(handler, 503, message, code="server_restarting", retry_after=retry_after,
                       **extra)
            return
        _relay(handler, child, up, retry_after)
    finally:
        if up is not None:
            up.close()


def _relay(handler: FrontHandler, child: Child, resp: http1.Upstream,
           retry_after: float) -> None:
    ctype = (resp.headers.get("Content-Type") or "").lower()
    if handler.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        _start(handler, resp, length=0)
        return
    if not ctype.startswith("text/event-stream"):
        try:
            data = resp.read_all(MAX_BUFFERED_BYTES + 1)
        except _UPSTREAM_ERRORS as exc:
            log.debug("upstream died mid-answer: %s", exc)
            message, extra = _death_message(child)
            send_error(handler, 503, message, code="server_restarting", retry_after=retry_after,
                       **extra)
            return
        if len(data) <= MAX_BUFFERED_BYTES:
            _start(handler, resp, length=len(data), body=data)
            return
        _stream(handler, child, resp, first=data, sse=False)
        return
    _stream(handler, child, resp, first=b"", sse=True)


def _start(handler: FrontHandler, resp: http1.Upstream, *, length: int | None,
           body: bytes = b"") -> None:
    """Status line and headers (and a small ``body``) in one write."""
    handler.send_response_only(resp.status, resp.reason)
    handler.send_header("Date", handler.date_time_string())
    for key, value in resp.headers.items():
        if key.lower() not in HOP_BY_HOP:
            handler.send_header(key, value)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    elif handler.request_version == "HTTP/1.1":
        handler.send_header("Transfer-Encoding", "chunked")
    else:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    if body and len(body) <= 1 << 20:
        handler._headers_buffer.append(b"\r\n" + body)  # type: ignore[attr-defined]
        handler.flush_headers()
        return
    handler.end_headers()
    if body:
        handler.wfile.write(body)


def _stream(handler: FrontHandler, child: Child, resp: http1.Upstream, *,
            first: bytes, sse: bool) -> None:
    chunked = handler.request_version == "HTTP/1.1"
    _start(handler, resp, length=None)
    out = handler.wfile

    def send(data: bytes) -> None:
        if not data:
            return
        if chunked:
            out.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            out.write(data)
        out.flush()

    tail = b""
    failed = False
    try:
        send(first)
        while True:
            try:
                data = resp.read1(CHUNK)
            except _UPSTREAM_ERRORS as exc:
                log.debug("upstream stream broke: %s", exc)
                failed = True
                break
            if not data:
                break
            tail = (tail + data)[-64:]
            send(data)
        if sse and not failed and b"[DONE]" not in tail:
            # A close-delimited stream that ended without its terminator: did the child die?
            failed = child.died.wait(DEATH_WAIT_SEC)
        if failed:
            if sse:
                message, extra = _death_message(child)
                send(replies.sse_error_event(message, code="server_restarting",
                                             type=replies.UNAVAILABLE, **extra))
            else:
                handler.close_connection = True
                return
        if chunked:
            out.write(b"0\r\n\r\n")
            out.flush()
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        handler.close_connection = True  # the client went away
