"""HTTP/1.1 message heads and body framing for the front (pure parsing over file objects).

The front parses two heads per forwarded request: the client's request and the child's
answer. The standard library parses headers with the :mod:`email` package, which was about
half of the front's CPU per request (``benchmarks/serve_throughput.py``; see
``docs/serve.md``), so the front reads heads itself: a head is a start line and at most
:data:`MAX_HEADERS` ``name: value`` lines of at most :data:`MAX_LINE` bytes each.

It is strict where a proxy has to be: a header name must be a token, a value may not carry
CR, LF or NUL, obsolete line folding is refused, and a request with two different
``Content-Length`` values is refused. The front never forwards the client's framing: it reads
the body whole and frames the upstream request itself, so a request cannot be smuggled past
it to the child.

:class:`Upstream` is one request to the child over a fresh connection (``Connection: close``)
and its answer, read with ``Content-Length``, chunked or close-delimited framing.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from io import BufferedIOBase

__all__ = ["MAX_HEADERS", "MAX_LINE", "HeadError", "Headers", "IncompleteBody", "Upstream",
           "check_target", "check_token", "read_headers"]

MAX_LINE = 65536
MAX_HEADERS = 100
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Bytes a request target may not hold (http.client refuses the same ones).
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


class HeadError(ValueError):
    """A malformed or oversized head; ``status`` is the answer a server gives it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class IncompleteBody(Exception):
    """The peer closed the connection before the body its framing announced was complete."""


class Headers:
    """Header fields in arrival order, looked up without regard to case."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items = items if items is not None else []

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``."""
        key = name.lower()
        for k, v in self._items:
            if k.lower() == key:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self._items if k.lower() == key]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __getitem__(self, name: str) -> str | None:  # like email.message.Message: None if absent
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def check_token(word: str) -> bool:
    """``word`` is an HTTP token (a method or a header name)."""
    return bool(_TOKEN_STR.match(word))


def check_target(target: str) -> bool:
    """``target`` holds no control character, space or DEL (it came from a split request line)."""
    return bool(target) and _BAD_TARGET.search(target) is None


def _readline(fp: BufferedIOBase) -> bytes:
    line = fp.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise HeadError(431, "header line too long")
    return line


def read_headers(fp: BufferedIOBase) -> Headers:
    """The header lines after a start line, up to and including the empty line."""
    items: list[tuple[str, str]] = []
    while True:
        line = _readline(fp)
        if line in (b"\r\n", b"\n", b""):
            return Headers(items)
        if len(items) >= MAX_HEADERS:
            raise HeadError(431, "too many headers")
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "obsolete header line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HeadError(400, "malformed header line")
        value = value.strip(b" \t\r\n")
        if _BAD_VALUE.search(value):
            raise HeadError(400, "control character in a header value")
        items.append((name.decode("ascii"), value.decode("latin-1")))


def content_length(headers: Headers) -> int | None:
    """The one ``Content-Length`` of ``headers`` (``None`` when absent)."""
    values = {v.strip() for v in headers.get_all("Content-Length")}
    if not values:
        return None
    if len(values) > 1:
        raise HeadError(400, "conflicting Content-Length headers")
    raw = values.pop()
    if not raw.isdigit() or not raw.isascii():
        raise HeadError(400, "invalid Content-Length header")
    return int(raw)


class Upstream:
    """One request to ``127.0.0.1:port`` and the head and body of its answer.

    ``read1(n)`` returns what has arrived (at most ``n`` bytes), ``b""`` at the end of a
    complete body, and raises :class:`IncompleteBody` when the connection ends early.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.connect(("127.0.0.1", port))  # a literal address: no resolver call
        except BaseException:
            self.sock.close()
            raise
        self.fp: BufferedIOBase = self.sock.makefile("rb")
        self.status = 0
        self.reason = ""
        self.headers = Headers()
        self._mode = "none"  # none | length | chunked | close
        self._left = 0  # bytes left (length) or in the current chunk (chunked)
        self._done = False

    def send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.sock.sendall(body)

    def read_head(self, method: str) -> None:
        """Read the status line and headers (skipping interim 1xx answers); set the framing."""
        while True:
            line = _readline(self.fp)
            if not line:
                raise IncompleteBody("connection closed before a status line")
            parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() \
                    or len(parts[1]) != 3:
                raise HeadError(502, "malformed status line from the model server")
            self.status = int(parts[1])
            self.reason = parts[2] if len(parts) > 2 else ""
            self.headers = read_headers(self.fp)
            if not (100 <= self.status < 200) or self.status == 101:
                break
        if method == "HEAD" or self.status in (204, 304) or self.status < 200:
            self._mode, self._done = "none", True
            return
        te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if te:
            if te != "chunked":
                raise HeadError(502, "unsupported Transfer-Encoding from the model server")
            self._mode = "chunked"
            return
        length = content_length(self.headers)
        if length is None:
            self._mode = "close"
        else:
            self._mode, self._left = "length", length
            self._done = length == 0

    @property
    def length(self) -> int | None:
        """Bytes still to come when the answer has a ``Content-Length``."""
        return self._left if self._mode == "length" else None

    def read1(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._mode == "length":
            data = self.fp.read1(min(n, self._left))
            if not data:
                raise IncompleteBody(f"{self._left} byte(s) of the body missing")
            self._left -= len(data)
            self._done = self._left == 0
            return data
        if self._mode == "close":
            data = self.fp.read1(n)
            self._done = not data
            return data
        return self._read_chunk(n)

    def _read_chunk(self, n: int) -> bytes:
        if self._left == 0:
            line = _readline(self.fp)
            if not line:
                raise IncompleteBody("connection closed before a chunk")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HeadError(502, "malformed chunk from the model server") from None
            if size < 0:
                raise HeadError(502, "malformed chunk from the model server")
            if size == 0:
                read_headers(self.fp)  # trailers, up to the empty line
                self._done = True
                return b""
            self._left = size
        data = self.fp.read1(min(n, self._left))
        if not data:
            raise IncompleteBody("connection closed inside a chunk")
        self._left -= len(data)
        if self._left == 0 and self.fp.readline(3) not in (b"\r\n", b"\n"):
            raise IncompleteBody("chunk not terminated")
        return data

    def read_all(self, limit: int) -> bytes:
        """The body up to ``limit`` bytes (fewer only when the body is complete)."""
        parts: list[bytes] = []
        total = 0
        while total < limit:
            data = self.read1(min(65536, limit - total))
            if not data:
                break
            parts.append(data)
            total += len(data)
        return b"".join(parts)

    def close(self) -> None:
        try:
            self.fp.close()
        finally:
            self.sock.close()
