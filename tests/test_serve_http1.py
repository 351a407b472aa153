"""The front's own HTTP/1.1 parsing (``serve/http1.py``), its connection threads
(``serve/workers.py``) and its request parsing, over real sockets.

The upstream here is a real stdlib HTTP server (or a raw socket script for framings the stdlib
server does not produce); the front is the real :class:`FrontServer`, routed to it by a
minimal supervisor object (the supervisor itself is exercised end to end in
``test_serve_crash.py``).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import wait_for

from metal_guard.serve import http1
from metal_guard.serve.front import FrontServer
from metal_guard.serve.workers import ThreadCache

WAIT_SEC = 30.0


# ---------------------------------------------------------------------------- heads


def heads(raw: bytes) -> http1.Headers:
    return http1.read_headers(io.BufferedReader(io.BytesIO(raw)))  # type: ignore[arg-type]


def test_headers_keep_order_and_are_looked_up_without_case() -> None:
    h = heads(b"Content-Type: a/b\r\nX-One: 1\r\nx-one: 2\r\n\r\nBODY")
    assert h.get("content-type") == "a/b"
    assert h["X-ONE"] == "1"
    assert h.get_all("X-One") == ["1", "2"]
    assert h.items() == [("Content-Type", "a/b"), ("X-One", "1"), ("x-one", "2")]
    assert "x-ONE" in h and "Missing" not in h
    assert h.get("Missing", "d") == "d" and h["Missing"] is None


@pytest.mark.parametrize(("raw", "status"), [
    (b"Bad Name: x\r\n\r\n", 400),          # a space in a name
    (b"Name : x\r\n\r\n", 400),             # whitespace before the colon (smuggling classic)
    (b"NoColon\r\n\r\n", 400),
    (b": empty-name\r\n\r\n", 400),
    (b"A: 1\r\n folded\r\n\r\n", 400),      # obsolete line folding
    (b"A: x\ry\r\n\r\n", 400),              # a bare CR inside a value
    (b"A: x\x00y\r\n\r\n", 400),            # NUL
    (b"A: " + b"x" * (http1.MAX_LINE + 1) + b"\r\n\r\n", 431),
    (b"".join(b"H%d: v\r\n" % i for i in range(http1.MAX_HEADERS + 1)) + b"\r\n", 431),
])
def test_hostile_heads_are_refused_with_the_right_status(raw: bytes, status: int) -> None:
    with pytest.raises(http1.HeadError) as err:
        heads(raw)
    assert err.value.status == status


def test_the_header_count_limit_is_inclusive() -> None:
    raw = b"".join(b"H%d: v\r\n" % i for i in range(http1.MAX_HEADERS)) + b"\r\n"
    assert len(heads(raw)) == http1.MAX_HEADERS


_names = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True)
_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                blacklist_characters="\x7f"), max_size=40).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=20))
def test_headers_round_trip(items: list[tuple[str, str]]) -> None:
    raw = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in items) + b"\r\n"
    assert heads(raw).items() == items


@pytest.mark.parametrize(("values", "expected"), [
    ([], None), (["12"], 12), ([" 12 "], 12), (["12", "12"], 12), (["0"], 0)])
def test_content_length_accepts_one_value(values: list[str], expected: int | None) -> None:
    assert http1.content_length(http1.Headers([("Content-Length", v) for v in values])) == expected


@pytest.mark.parametrize("values", [["12", "13"], ["-1"], ["+5"], ["0x10"], ["1e3"], [""],
                                    ["١٢"]])
def test_content_length_refuses_conflicts_and_non_digits(values: list[str]) -> None:
    with pytest.raises(http1.HeadError) as err:
        http1.content_length(http1.Headers([("Content-Length", v) for v in values]))
    assert err.value.status == 400


def test_request_targets_with_controls_or_spaces_are_not_targets() -> None:
    assert http1.check_target("/v1/chat/completions?x=1")
    for bad in ("", "/a b", "/a\x00", "/a\x7f", "/a\tb", "/a\x1b[31m"):
        assert not http1.check_target(bad)
    assert http1.check_token("POST") and not http1.check_token("PO ST")
    assert not http1.check_token("GET\x00")


# ---------------------------------------------------------------------------- Upstream


class RawServer:
    """A loopback listener answering every connection with ``reply`` bytes, then closing."""

    def __init__(self, reply: bytes, *, hold_open: bool = False) -> None:
        self.reply = reply
        self.hold_open = hold_open
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.reply)
                if self.hold_open:
                    time.sleep(0.2)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    made: list[RawServer] = []

    def make(reply: bytes, **kw: Any) -> RawServer:
        made.append(RawServer(reply, **kw))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def fetch(port: int, method: str = "GET", body: bytes = b"") -> tuple[http1.Upstream, bytes]:
    up = http1.Upstream(port, WAIT_SEC)
    try:
        up.send(method, "/p", [("X-A", "1")], body)
        up.read_head(method)
        return up, up.read_all(1 << 20)
    finally:
        up.close()


def test_upstream_reads_a_content_length_body_and_frames_its_request(raw_server: Any) -> None:
    srv = raw_server(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5\r\n\r\nhello-and-junk-after")
    up, body = fetch(srv.port, "POST", b"{}")
    assert (up.status, up.reason, body) == (200, "OK", b"hello")
    head = srv.requests[0].decode("latin-1")
    assert head.startswith("POST /p HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}\r\n" in head
    assert "Content-Length: 2\r\n" in head and "Connection: close\r\n" in head
    assert "X-A: 1\r\n" in head


def test_upstream_decodes_chunks_and_trailers(raw_server: Any) -> None:
    srv = raw_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\n")
    _, body = fetch(srv.port)
    assert body == b"hello, world"


def test_upstream_reads_a_close_delimited_body(raw_server: Any) -> None:
    srv = raw_server(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                     b"data: 1\n\ndata: [DONE]\n\n")
    _, body = fetch(srv.port)
    assert body == b"data: 1\n\ndata: [DONE]\n\n"


def test_upstream_skips_interim_answers(raw_server: Any) -> None:
    srv = raw_server(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
                     b"Content-Length: 2\r\n\r\nok")
    up, body = fetch(srv.port, "POST", b"x")
    assert (up.status, body) == (201, b"ok")


def test_upstream_head_answers_have_no_body(raw_server: Any) -> None:
    srv = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    up, body = fetch(srv.port, "HEAD")
    assert (up.status, body) == (200, b"")


@pytest.mark.parametrize("reply", [
    b"HTTP/1.0 200 OK\r\nContent-Length: 50\r\n\r\nonly-part",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"",  # closed before a status line
])
def test_a_body_cut_short_is_incomplete_never_a_clean_end(raw_server: Any, reply: bytes) -> None:
    srv = raw_server(reply)
    with pytest.raises(http1.IncompleteBody):
        fetch(srv.port)


@pytest.mark.parametrize("reply", [
    b"SPDY/3 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
])
def test_a_malformed_answer_is_a_head_error(raw_server: Any, reply: bytes) -> None:
    srv = raw_server(reply)
    with pytest.raises(http1.HeadError):
        fetch(srv.port)


def test_a_refused_connection_is_an_oserror_and_leaks_no_socket() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connect is refused
        with pytest.raises(ConnectionRefusedError):
            http1.Upstream(port, WAIT_SEC)


# ---------------------------------------------------------------------------- ThreadCache


def test_thread_cache_reuses_idle_threads() -> None:
    seen: list[int] = []
    done = threading.Event()
    cache = ThreadCache(lambda: (seen.append(threading.get_ident()), done.set()), idle_sec=WAIT_SEC)
    try:
        for _ in range(5):
            done.clear()
            cache.submit()
            assert done.wait(WAIT_SEC)
            wait_for(lambda: cache.idle == 1, interval=0.001, what="the thread to idle")
        assert len(set(seen)) == 1, "each job got a new thread"
    finally:
        cache.close()


def test_a_burst_never_waits_for_a_busy_thread() -> None:
    n = 12
    barrier = threading.Barrier(n, timeout=WAIT_SEC)  # passes only if all n run at once
    passed: list[bool] = []
    cache = ThreadCache(lambda: passed.append(barrier.wait() >= 0), idle_sec=WAIT_SEC, max_idle=2)
    try:
        for _ in range(n):
            cache.submit()
        wait_for(lambda: len(passed) == n, what="all jobs past the barrier")
        assert passed == [True] * n
        wait_for(lambda: cache.idle == 2, what="max_idle threads left idle")  # the rest ended
    finally:
        cache.close()


def _named(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name)


def test_idle_threads_end_after_idle_sec_and_on_close() -> None:
    # Counted by name: other tests' threads may start or end meanwhile.
    cache = ThreadCache(lambda: None, idle_sec=0.2, name="cache-under-test-1")
    cache.submit()
    wait_for(lambda: _named("cache-under-test-1") == 0, what="the idle thread to end")
    assert cache.idle == 0
    cache2 = ThreadCache(lambda: None, idle_sec=WAIT_SEC, name="cache-under-test-2")
    cache2.submit()
    wait_for(lambda: cache2.idle == 1, what="the thread to idle")
    assert _named("cache-under-test-2") == 1
    cache2.close()
    wait_for(lambda: _named("cache-under-test-2") == 0, what="close() to end the idle thread")
    with pytest.raises(RuntimeError):
        cache2.submit()


# ---------------------------------------------------------------------------- the front


class Echo(BaseHTTPRequestHandler):
    """Answers with what it received: method, path, headers, body."""

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"method": self.command, "path": self.path,
                           "headers": dict(self.headers.items()),
                           "body": self.rfile.read(n).decode("latin-1")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args: Any) -> None:
        pass


class Route:
    """The two things the front asks of a supervisor when forwarding."""

    class options:
        standby = False

    last_time_to_ready_sec = 1.0

    def __init__(self, port: int) -> None:
        self.child = type("C", (), {"port": port, "died": threading.Event(), "crash": None,
                                    "exitcode": None})()

    def route(self) -> tuple[Any, str, float]:
        return self.child, "ready", 1.0

    def snapshot(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def front_port() -> Iterator[int]:
    echo = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    front = FrontServer(("127.0.0.1", 0), Route(echo.server_address[1]), upstream_timeout=WAIT_SEC,
                        max_body_bytes=1 << 16)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        yield front.server_address[1]
    finally:
        front.shutdown()
        front.server_close()
        echo.shutdown()
        echo.server_close()


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SEC) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /\r\n\r\n", 400),                               # HTTP/0.9 form
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTX/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.x\r\n\r\n", 400),
    (b"G\x00T / HTTP/1.1\r\n\r\n", 400),
    (b"GET /a\x1bb HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
])
def test_the_front_refuses_bad_requests(front_port: int, request_bytes: bytes, status: int) -> None:
    assert status_of(raw(front_port, request_bytes)) == status


def test_the_front_frames_the_upstream_request_itself(front_port: int) -> None:
    """Chunked in, Content-Length out; hop-by-hop headers dropped; the client's
    Content-Length never reaches the child (no request smuggling through the front)."""
    reply = raw(front_port, b"POST /v1/x?q=1 HTTP/1.1\r\nHost: front\r\nX-Keep: yes\r\n"
                            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                            b"GET /smuggled HTTP/1.1\r\n\r\n")
    assert status_of(reply) == 200
    echoed = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert (echoed["method"], echoed["path"], echoed["body"]) == ("POST", "/v1/x?q=1", "abcde")
    headers = {k.lower(): v for k, v in echoed["headers"].items()}
    assert headers["content-length"] == "5" and "transfer-encoding" not in headers
    assert headers["x-keep"] == "yes" and headers["connection"] == "close"
    assert reply.count(b"HTTP/1.") == 1, "the bytes after the body were run as a request"


def test_keep_alive_and_expect_100_continue(front_port: int) -> None:
    with socket.create_connection(("127.0.0.1", front_port), timeout=WAIT_SEC) as s:
        f = s.makefile("rb")
        s.sendall(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 100")
        assert f.readline() == b"\r\n"
        s.sendall(b"hi")
        assert f.readline().startswith(b"HTTP/1.1 200")
        h = http1.read_headers(f)
        assert json.loads(f.read(int(h["Content-Length"] or 0)))["body"] == "hi"
        s.sendall(b"GET /b HTTP/1.1\r\n\r\n")  # the same connection serves a second request
        assert f.readline().startswith(b"HTTP/1.1 200")
        h = http1.read_headers(f)
        assert json.loads(f.read(int(h["Content-Length"] or 0)))["path"] == "/b"
        assert h["Date"] and h["Date"].endswith(" GMT")
