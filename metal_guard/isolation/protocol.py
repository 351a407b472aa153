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
with ``METALGUARD_WORKER_TEST_FAULTS=1`` and ``METALGUARD_TESTING=1``).
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from metal_guard.errors import WorkerError

__all__ = [
    "PARENT_FRAMES",
    "PROTOCOL_VERSION",
    "WORKER_FRAMES",
    "MAX_FRAME_BYTES",
    "Channel",
    "FrameTooLarge",
    "ProtocolError",
    "SendTimeout",
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
#: Largest frame accepted (a long prompt or an image path list fits easily). The parent
#: refuses a larger request before sending it (``ValueError`` naming this limit).
MAX_FRAME_BYTES = 64 << 20
#: Room kept in a request for the fields the runner adds after validation (``id``, ...).
REQUEST_RESERVE_BYTES = 256
_HEADER = struct.Struct("!I")
_READ_BYTES = 1 << 16
#: Receive buffer bound: one whole frame plus a read's worth.
_MAX_BUFFERED = MAX_FRAME_BYTES + _HEADER.size + _READ_BYTES
#: Longest single wait inside a blocked send (it rechecks the deadline and drains in between).
_WAIT_STEP_SEC = 0.1
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


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
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
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


class FrameTooLarge(ValueError):
    """A frame would exceed :data:`MAX_FRAME_BYTES`; it was not sent (nothing was written)."""


class SendTimeout(TimeoutError):
    """The other side did not take a frame within the send timeout.

    Part of the frame may have been written, so the channel is closed: the stream of frames
    can no longer be trusted.
    """


_NO_TIMEOUT: Any = object()


class Channel:
    """One end of the worker socket: length-prefixed frames that cannot deadlock.

    A frame on the wire is a 4-byte big-endian length and that many bytes of UTF-8 JSON.

    * **Sending** is non-blocking underneath: while the peer's buffer is full, ``send`` keeps
      reading whatever the peer sends into the receive buffer (so two sides that write at once
      never wait on each other forever) and gives up after ``timeout`` seconds (default
      ``send_timeout``; ``None`` waits as long as the peer lives) with :class:`SendTimeout`.
      A frame larger than :data:`MAX_FRAME_BYTES` is refused before anything is written
      (:class:`FrameTooLarge`). Sends from several threads are serialised so frames never
      interleave; a thread waiting for another's send is bounded by the same timeout.
    * **Receiving** is buffered: :meth:`poll` answers True only when a *whole* frame (or EOF)
      is buffered, so :meth:`recv` after a successful ``poll`` never blocks on a half-sent
      frame. An oversize header raises :class:`ProtocolError` once and the frame's bytes are
      then skipped as they arrive (the sender is drained, never left blocked, and the stream
      stays in step).
    """

    def __init__(self, sock: socket.socket, schema: dict[str, tuple[str, ...]], *,
                 send_timeout: float | None = None) -> None:
        self.sock = sock
        self.schema = schema
        self.send_timeout = send_timeout
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversize frame still to discard
        self._eof = False
        self._closed = False
        self._fd = sock.fileno()
        self._read_poller: Any = None
        self._write_poller: Any = None
        if hasattr(select, "poll"):
            self._read_poller = select.poll()
            self._read_poller.register(self._fd, select.POLLIN)
            self._write_poller = select.poll()
            self._write_poller.register(self._fd, select.POLLIN | select.POLLOUT)

    @classmethod
    def from_fd(cls, fd: int, schema: dict[str, tuple[str, ...]], *,
                send_timeout: float | None = None) -> Channel:
        return cls(socket.socket(fileno=fd), schema, send_timeout=send_timeout)

    # ------------------------------------------------------------------ sending

    def send(self, obj: dict[str, Any], *, timeout: Any = _NO_TIMEOUT) -> None:
        """Send one frame; see the class notes for the timeout and size rules."""
        data = encode(obj)
        if len(data) > MAX_FRAME_BYTES:
            raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the protocol limit of "
                                f"{MAX_FRAME_BYTES} bytes ({MAX_FRAME_BYTES >> 20} MiB)")
        wait = self.send_timeout if timeout is _NO_TIMEOUT else timeout
        deadline = None if wait is None else time.monotonic() + max(0.0, float(wait))
        if not self._send_lock.acquire(timeout=-1 if deadline is None
                                       else max(0.0, deadline - time.monotonic())):
            raise SendTimeout(f"another thread's send did not finish within {wait}s")
        try:
            self._send_all(memoryview(_HEADER.pack(len(data)) + data), deadline, wait)
        finally:
            self._send_lock.release()

    def _send_all(self, view: memoryview, deadline: float | None, wait: Any) -> None:
        sent_any = False
        while view:
            if self._closed:
                raise OSError("channel is closed")
            try:
                n = self.sock.send(view, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                view = view[n:]
                sent_any = True
                continue
            step = _WAIT_STEP_SEC
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if sent_any:  # half a frame on the wire: the stream is unusable
                        self.close()
                    raise SendTimeout(f"the other side took no data for {wait}s")
                step = min(step, remaining)
            readable, _writable = self._wait(step, write=True)
            if readable:
                self._drain_nowait()

    # ------------------------------------------------------------------ receiving

    def _wait(self, timeout: float | None, *, write: bool = False) -> tuple[bool, bool]:
        """(readable, writable) within ``timeout`` seconds (``None``: wait)."""
        if hasattr(select, "poll"):
            # One poller per direction: reads wait under the receive lock, writes under the
            # send lock, so neither object is ever polled from two threads at once.
            poller = self._write_poller if write else self._read_poller
            ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
            try:
                ready = poller.poll(ms)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                return False, False
            flags = 0
            for _fd, ev in ready:
                flags |= ev
            hangup = select.POLLHUP | select.POLLERR | select.POLLNVAL
            return bool(flags & (select.POLLIN | hangup)), bool(flags & (select.POLLOUT | hangup))
        r, w, _ = select.select([self._fd], [self._fd] if write else [], [], timeout)  # pragma: no cover
        return bool(r), bool(w)  # pragma: no cover

    def _ingest(self, chunk: bytes) -> None:
        if self._skip:
            drop = min(self._skip, len(chunk))
            self._skip -= drop
            chunk = chunk[drop:]
        self._buf += chunk

    def _read_nowait(self) -> bool:
        """Read what is available now into the buffer (caller holds the receive lock).
        False when nothing was available."""
        got = False
        while len(self._buf) < _MAX_BUFFERED and not self._eof:
            try:
                chunk = self.sock.recv(_READ_BYTES, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self._eof = True
                return True
            got = True
            self._ingest(chunk)
        return got

    def _drain_nowait(self) -> None:
        """While a send waits: read incoming frames into the buffer so the peer, perhaps
        blocked writing to us, can go on (skipped when another thread is receiving)."""
        if self._recv_lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._read_nowait()
            except OSError:
                pass
            finally:
                self._recv_lock.release()

    def _frame_ready(self) -> bool:
        """A whole frame heads the buffer (caller holds the receive lock)."""
        if self._skip:
            drop = min(self._skip, len(self._buf))
            del self._buf[:drop]
            self._skip -= drop
            if self._skip:
                return False
        if len(self._buf) < _HEADER.size:
            return False
        (size,) = _HEADER.unpack_from(self._buf)
        if size > MAX_FRAME_BYTES:
            del self._buf[:_HEADER.size]
            self._skip = size
            self._frame_ready()  # discard what is already buffered
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}; skipping it")
        return len(self._buf) >= _HEADER.size + size

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a whole frame (or EOF) can be read now, waiting up to ``timeout`` seconds
        (``None``: wait). Raises :class:`ProtocolError` for an oversize frame header."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._recv_lock:
            while True:
                if self._closed:
                    raise OSError("channel is closed")
                if self._frame_ready() or self._eof:
                    return True
                if self._read_nowait():
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                readable, _ = self._wait(remaining)
                if not readable and remaining is not None and deadline is not None \
                        and time.monotonic() >= deadline:
                    return False

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """Next frame, waiting up to ``timeout`` seconds (``None``: wait); ``EOFError`` when
        the other side is gone, ``TimeoutError`` when no whole frame arrived in time."""
        with self._recv_lock:
            if not self.poll(timeout):
                raise TimeoutError(f"no whole frame within {timeout}s")
            if not self._frame_ready():
                raise EOFError("the other side closed the channel")
            (size,) = _HEADER.unpack_from(self._buf)
            start = _HEADER.size
            data = bytes(self._buf[start:start + size])
            del self._buf[:start + size]
        return decode(data, self.schema)

    def fileno(self) -> int:
        return int(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
        size = len(encode(req))
    except TypeError as exc:
        raise TypeError(f"generation arguments must be JSON-serialisable: {exc}") from None
    check_request_size(size)
    return req


def check_request_size(size: int) -> None:
    """Refuse (``ValueError``) a request that would not fit in one frame, before sending it."""
    limit = MAX_FRAME_BYTES - REQUEST_RESERVE_BYTES
    if size > limit:
        raise ValueError(
            f"the request is {size} bytes as JSON; an isolated worker accepts at most {limit} "
            f"bytes per request (protocol frame limit MAX_FRAME_BYTES = {MAX_FRAME_BYTES >> 20} "
            "MiB): shorten the prompt")
