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

from metal_guard.adapters import _openai_errors as oai

__all__ = ["error_body", "error_json", "retry_after_value", "sse_error_event"]

#: Longest message we put in a body (a crash detail can be long).
MAX_MESSAGE_CHARS = 500


def error_body(message: str, *, code: str, type: str = oai.SERVER_ERROR,
               param: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{"error": {...}}`` with OpenAI's four keys, built by the same helper as the guarded
    ``mlx_lm.server``'s answers (plus ``extra`` keys, e.g. the crash class)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(message))[:MAX_MESSAGE_CHARS]
    body = oai.error_body(text, type, code, param)
    err = body["error"]
    for key, value in extra.items():
        if value is not None and key not in err:
            err[key] = value
    return body


#: The ``type`` of a "try again later" answer (HTTP 503), as the guarded mlx_lm.server sends it.
UNAVAILABLE = oai.UNAVAILABLE


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
