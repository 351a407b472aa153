"""OpenAI-shaped error bodies: ``{"error": {"message", "type", "code", "param"}}``.

Pure functions, no MLX, no I/O: shared by the ``mlx_lm.server`` adapter and any other HTTP front
of metal-guard. The ``openai`` SDK reads ``type``, ``code`` and ``param`` from such a body
(``APIStatusError.type`` / ``.code`` / ``.param``) and, inside a server-sent-event stream, raises
``APIError`` with ``message`` when an event carries ``{"error": {...}}``.

Messages often come from exception texts (paths, model names a client sent): they are cut to
:data:`MAX_MESSAGE_CHARS` and JSON-encoded, so nothing can break out of the body or, in a
stream, out of the ``data:`` line (JSON escapes every newline).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "INVALID_REQUEST",
    "MAX_MESSAGE_CHARS",
    "SERVER_ERROR",
    "UNAVAILABLE",
    "encode_error",
    "error_body",
    "sse_error_event",
]

#: ``type`` of a request the client must change (bad field, unknown model).
INVALID_REQUEST = "invalid_request_error"
#: ``type`` of a request that may succeed later (OOM, cadence, not ready): always HTTP 503.
UNAVAILABLE = "service_unavailable_error"
#: ``type`` of a failure inside the server itself.
SERVER_ERROR = "server_error"

MAX_MESSAGE_CHARS = 2000
_MAX_TOKEN_CHARS = 100


def _token(value: Any) -> str | None:
    """A ``type`` / ``code`` / ``param`` value: a short printable string, or ``None``."""
    if value is None:
        return None
    text = "".join(c for c in str(value) if c.isprintable())
    return text[:_MAX_TOKEN_CHARS] or None


def error_body(message: Any, type_: str, code: Any = None, param: Any = None) -> dict[str, Any]:
    """``{"error": {"message": ..., "type": ..., "code": ..., "param": ...}}`` (all four keys
    always present; ``code`` and ``param`` may be ``None``)."""
    text = str(message) if message is not None else ""
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return {"error": {"message": text or "error", "type": _token(type_) or SERVER_ERROR,
                      "code": _token(code), "param": _token(param)}}


def encode_error(message: Any, type_: str, code: Any = None, param: Any = None) -> bytes:
    """:func:`error_body` as UTF-8 JSON bytes, ready for a response body."""
    return json.dumps(error_body(message, type_, code, param)).encode()


def sse_error_event(message: Any, type_: str, code: Any = None, param: Any = None) -> bytes:
    """One server-sent event carrying the error: ``data: {"error": {...}}`` and a blank line."""
    return b"data: " + encode_error(message, type_, code, param) + b"\n\n"
