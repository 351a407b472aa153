"""OpenAI-shaped error bodies for the front (pure functions, no I/O).

OpenAI clients parse ``{"error": {"message", "type", "code", "param"}}``; the official
``openai`` client raises ``InternalServerError`` (status 503) with that body attached. In the
middle of an SSE stream the same object goes out as one last ``data:`` event, which the
client raises as ``APIError`` while iterating.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["error_body", "error_json", "retry_after_value", "sse_error_event"]

#: Longest message we put in a body (a crash detail can be long).
MAX_MESSAGE_CHARS = 500


def _clean(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return text[:MAX_MESSAGE_CHARS]


def error_body(message: str, *, code: str, type: str = "server_error",
               param: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{"error": {...}}`` with OpenAI's four keys (plus ``extra`` keys, e.g. the crash class)."""
    err: dict[str, Any] = {"message": _clean(message), "type": type, "code": code, "param": param}
    for key, value in extra.items():
        if value is not None:
            err[key] = value
    return {"error": err}


def error_json(message: str, *, code: str, **extra: Any) -> bytes:
    return json.dumps(error_body(message, code=code, **extra), sort_keys=True).encode()


def sse_error_event(message: str, *, code: str, **extra: Any) -> bytes:
    """The final event of a stream whose server died: ``data: {"error": ...}`` + blank line."""
    return b"data: " + error_json(message, code=code, **extra) + b"\n\n"


def retry_after_value(seconds: float | None) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1, at most a day."""
    if seconds is None or not math.isfinite(seconds):
        return "1"
    return str(int(min(86400, max(1, math.ceil(seconds)))))
