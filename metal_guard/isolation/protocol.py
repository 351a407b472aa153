"""The framed protocol between a parent and its isolated worker (L7).

Each frame is one JSON object sent as one length-prefixed message over a Unix socket pair
(:class:`Channel`). JSON rather than pickle: a frame from a confused or foreign process can only
be rejected, never execute code.

Every frame carries ``"v"`` (:data:`PROTOCOL_VERSION`) and ``"type"``. Worker → parent:

* ``ready``     — model loaded; ``pid``, ``create_time``, ``model_id``, ``backend``, ``load_sec``, ...
* ``token``     — generated text: ``id`` (request), ``text`` (may be ``""``), ``n`` (steps so far;
  steps closer than 2 ms share a frame)
* ``done``      — request finished: ``id``, ``finish_reason``, token counts, rates, memory
* ``error``     — request (or load) failed: ``id``, ``exc_type``, ``message``, ``traceback``, ``phase``
* ``heartbeat`` — the worker is alive and busy: ``phase`` (``load`` / ``prefill`` / ``generate``)
* ``stats``     — answer to a ``stats`` request: MLX counters in bytes

Parent → worker: ``generate``, ``stop`` (end the current request early), ``stats``,
``shutdown`` and the test-only ``_debug_fault`` (honoured only when the worker was started
with ``METALGUARD_WORKER_TEST_FAULTS=1``).
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import struct
import threading
from typing import Any

from metal_guard.errors import WorkerError

__all__ = [
    "PARENT_FRAMES",
    "PROTOCOL_VERSION",
    "WORKER_FRAMES",
    "Channel",
    "ProtocolError",
    "decode",
    "encode",
    "frame",
    "generate_request",
]

#: Bump on any incompatible change; a worker and a parent of different versions refuse each other.
PROTOCOL_VERSION = 1

# Worker -> parent.
READY = "ready"
TOKEN = "token"
DONE = "done"
ERROR = "error"
HEARTBEAT = "heartbeat"
STATS = "stats"
# Parent -> worker.
GENERATE = "generate"
STOP = "stop"
SHUTDOWN = "shutdown"
DEBUG_FAULT = "_debug_fault"

#: Required fields per frame type (besides ``v`` and ``type``).
WORKER_FRAMES: dict[str, tuple[str, ...]] = {
    READY: ("pid", "model_id", "backend"),
    TOKEN: ("id", "text", "n"),
    DONE: ("id", "finish_reason"),
    ERROR: ("exc_type", "message"),
    HEARTBEAT: ("phase",),
    STATS: (),
}
PARENT_FRAMES: dict[str, tuple[str, ...]] = {
    GENERATE: ("id", "prompt"),
    STOP: (),
    STATS: (),
    SHUTDOWN: (),
    DEBUG_FAULT: ("kind",),
}
#: Sampling arguments mlx-vlm's generate_step would accept and silently ignore.
VLM_UNSUPPORTED = ("min_tokens_to_keep", "xtc_probability", "xtc_threshold")
#: Largest frame accepted (a long prompt or an image path list fits easily).
MAX_FRAME_BYTES = 64 << 20
_HEADER = struct.Struct("!I")
_READ_BYTES = 1 << 16


class ProtocolError(WorkerError):
    """A frame was malformed, of an unknown type, or from another protocol version."""


def frame(frame_type: str, /, **fields: Any) -> dict[str, Any]:
    """Build a frame dict of type ``frame_type``."""
    return {"v": PROTOCOL_VERSION, "type": frame_type, **fields}


def encode(obj: dict[str, Any]) -> bytes:
    """Serialise a frame (adds ``v`` if missing). Non-JSON values raise ``TypeError``."""
    if "v" not in obj:
        obj = {"v": PROTOCOL_VERSION, **obj}
    try:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN / inf
        raise TypeError(f"frame is not valid JSON: {exc}") from None
    return data.encode("utf-8")


def decode(data: bytes, schema: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """Parse and check one frame; :class:`ProtocolError` names what is wrong.

    ``schema`` is :data:`WORKER_FRAMES` (on the parent side) or :data:`PARENT_FRAMES`.
    """
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a {type(obj).__name__}, expected an object")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: got {version!r}, expected {PROTOCOL_VERSION} "
            "(parent and worker come from different metal-guard versions)"
        )
    kind = obj.get("type")
    if schema is not None:
        if kind not in schema:
            raise ProtocolError(f"unknown frame type {kind!r}")
        missing = [k for k in schema[kind] if k not in obj]
        if missing:
            raise ProtocolError(f"{kind} frame lacks {', '.join(missing)}")
    elif not isinstance(kind, str):
        raise ProtocolError("frame has no type")
    return obj


class Channel:
    """One end of the worker socket: length-prefixed frames, thread-safe ``send``.

    A frame on the wire is a 4-byte big-endian length and that many bytes of UTF-8 JSON.
    Reads go through a buffer, so frames that queued up while the reader was busy cost one
    ``recv`` between them, not two system calls each. Sends from several threads (the
    worker's heartbeat thread, the parent's footprint monitor) are serialised by a lock so
    frames never interleave. Only one thread receives at a time (the caller's job).
    """

    def __init__(self, sock: socket.socket, schema: dict[str, tuple[str, ...]]) -> None:
        self.sock = sock
        self.schema = schema
        self._send_lock = threading.Lock()
        self._buf = bytearray()
        self._closed = False
        self._poller: Any = None
        if hasattr(select, "poll"):
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)

    @classmethod
    def from_fd(cls, fd: int, schema: dict[str, tuple[str, ...]]) -> Channel:
        return cls(socket.socket(fileno=fd), schema)

    def send(self, obj: dict[str, Any]) -> None:
        data = encode(obj)
        with self._send_lock:
            self.sock.sendall(_HEADER.pack(len(data)) + data)

    def _frame_size(self) -> int | None:
        if len(self._buf) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
        return size if len(self._buf) >= _HEADER.size + size else None

    def recv(self) -> dict[str, Any]:
        """Next frame (blocking); ``EOFError`` when the other side is gone."""
        while (size := self._frame_size()) is None:
            if self._closed:
                raise OSError("channel is closed")
            chunk = self.sock.recv(_READ_BYTES)
            if not chunk:
                raise EOFError("the other side closed the channel")
            self._buf += chunk
        start = _HEADER.size
        data = bytes(self._buf[start:start + size])
        del self._buf[:start + size]
        return decode(data, self.schema)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a frame (or EOF) can be read within ``timeout`` seconds (``None``: wait)."""
        if self._frame_size() is not None:
            return True
        if self._closed:
            raise OSError("channel is closed")
        if self._poller is None:  # pragma: no cover - platforms without poll()
            ready, _, _ = select.select([self.sock], [], [], timeout)
            return bool(ready)
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        return bool(self._poller.poll(ms))

    def fileno(self) -> int:
        return int(self.sock.fileno())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._poller is not None:
                self._poller.unregister(self.sock.fileno())
        except (OSError, KeyError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------- requests


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
            integer: bool = False) -> float | int:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, not {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{name} must be {bounds}, not {value!r}")
    return value


def _check_prompt(prompt: Any) -> str | list[dict[str, Any]]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt
    ):
        return [dict(m) for m in prompt]
    raise TypeError("prompt must be a string or a non-empty list of chat messages "
                    "({'role': ..., 'content': ...})")


def generate_request(
    prompt: Any,
    *,
    backend: str,
    max_tokens: int,
    temperature: float,
    system: str | None,
    seed: int | None,
    images: Any,
    apply_chat_template: bool,
    extra: dict[str, Any] | None,
    sampling: dict[str, Any],
    sampling_keys: tuple[str, ...],
) -> dict[str, Any]:
    """Validate the caller's arguments and build a ``generate`` frame (``id`` added later).

    Bad input raises ``TypeError`` / ``ValueError`` naming the argument, before any worker
    is touched.
    """
    unknown = sorted(set(sampling) - set(sampling_keys))
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(unknown)} "
                        f"(sampling arguments: {', '.join(sampling_keys)}; pass library "
                        "keywords through extra={...})")
    if backend == "mlx-vlm":
        ignored = sorted(k for k in VLM_UNSUPPORTED if sampling.get(k) is not None)
        if ignored:  # mlx-vlm would silently ignore them: refuse instead
            raise ValueError(f"mlx-vlm does not support {', '.join(ignored)}")
    req: dict[str, Any] = frame(GENERATE, prompt=_check_prompt(prompt))
    req["max_tokens"] = int(_number("max_tokens", max_tokens, lo=1, integer=True))
    req["temperature"] = float(_number("temperature", temperature, lo=0.0))
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string or None, not {system!r}")
    req["system"] = system or None
    if seed is not None:
        req["seed"] = int(_number("seed", seed, lo=0, integer=True))
    req["apply_chat_template"] = bool(apply_chat_template)
    ranges = {"top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "xtc_probability": (0.0, 1.0),
              "xtc_threshold": (0.0, 1.0)}
    ints = {"top_k", "min_tokens_to_keep", "repetition_context_size", "presence_context_size",
            "frequency_context_size"}
    for key, value in sampling.items():
        if value is None:
            continue
        if key == "logit_bias":
            if not isinstance(value, dict):
                raise TypeError("logit_bias must be a dict {token_id: bias}")
            req[key] = {str(int(k)): float(_number(f"logit_bias[{k}]", v))
                        for k, v in value.items()}
            continue
        lo, hi = ranges.get(key, (0.0, None))
        req[key] = _number(key, value, lo=lo, hi=hi, integer=key in ints)
    if images is not None:
        if backend != "mlx-vlm":
            raise ValueError("image= needs backend='mlx-vlm'")
        items = [images] if isinstance(images, str) or hasattr(images, "__fspath__") \
            else list(images)
        if not all(isinstance(i, str) or hasattr(i, "__fspath__") for i in items):
            raise TypeError("image must be a path, a URL or a list of them")
        req["images"] = [str(os.fspath(i)) for i in items]
    if extra:
        if not isinstance(extra, dict):
            raise TypeError("extra must be a dict of keyword arguments for the library")
        req["extra"] = dict(extra)
    try:
        encode(req)
    except TypeError as exc:
        raise TypeError(f"generation arguments must be JSON-serialisable: {exc}") from None
    return req
