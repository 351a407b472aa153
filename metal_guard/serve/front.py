"""The front's HTTP server: its own three routes, everything else forwarded to the child.

A ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive towards clients).
``GET /health``, ``GET /metal-guard/status`` and ``GET /metrics`` are answered here, whatever
the child's state; any other request is forwarded (:mod:`.proxy`) when a ready child exists,
else answered 503 + ``Retry-After`` with an OpenAI-shaped body.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from metal_guard.serve import http1, metrics, proxy
from metal_guard.serve.workers import ThreadCache

log = logging.getLogger("metal_guard.serve.front")

__all__ = ["FrontHandler", "FrontServer"]

OWN_ROUTES = ("/health", "/metal-guard/status", "/metrics")
_date_cache: tuple[int, str] = (0, "")  # (second, its Date value), replaced whole


class FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], supervisor: Any, *, upstream_timeout: float,
                 max_body_bytes: int) -> None:
        host = address[0]
        infos = socket.getaddrinfo(host, address[1], type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        self.address_family = infos[0][0]
        self.supervisor = supervisor
        self.upstream_timeout = upstream_timeout
        self.max_body_bytes = max_body_bytes
        sockaddr = infos[0][4]
        self.threads = ThreadCache(self.process_request_thread)
        super().__init__((str(sockaddr[0]), int(sockaddr[1])), FrontHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.threads.submit(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.threads.close()

    @property
    def listen(self) -> tuple[str, int]:
        addr = self.server_address
        return str(addr[0]), int(addr[1])


def _breaker_status() -> dict[str, Any] | None:
    try:
        from metal_guard.breaker import CircuitBreaker

        return CircuitBreaker(auto_ingest=False).status().as_dict()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "metal-guard-serve"
    server: FrontServer

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without TCP_NODELAY, Nagle + the client's
        # delayed ACK would hold the second write ~40 ms (it halved requests/s in the benchmark).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, formatted once per second rather than per answer."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        global _date_cache
        now = int(time.time())
        second, text = _date_cache
        if second != now:
            text = super().date_time_string(now)
            _date_cache = (now, text)
        return text

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s - %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        """The request line and headers, with :mod:`.http1` instead of the email parser.

        Same outcomes as the standard library's ``parse_request`` (400 / 431 / 505, keep-alive
        rules, ``Expect: 100-continue``), plus a refusal of request targets holding control
        characters or spaces and of header lines a proxy must not pass on.
        """
        self.command = None  # type: ignore[assignment]
        # Errors before the version is known still get a status line (the stdlib's HTTP/0.9
        # default would send a bare body).
        self.request_version = version = "HTTP/1.0"
        self.close_connection = True
        raw: bytes = self.raw_requestline  # type: ignore[attr-defined]
        requestline = raw.decode("iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(400, f"Bad request syntax ({requestline[:80]!r})")
            return False
        command, path, version = words
        try:
            if not version.startswith("HTTP/"):
                raise ValueError
            major, minor = version.split("/", 1)[1].split(".")
            if not (major.isdigit() and minor.isdigit() and len(major) < 10 and len(minor) < 10):
                raise ValueError
            version_number = int(major), int(minor)
        except ValueError:
            self.send_error(400, f"Bad request version ({version[:40]!r})")
            return False
        if version_number >= (2, 0):
            self.send_error(505, f"Invalid HTTP version ({version[:40]})")
            return False
        if not http1.check_token(command) or not http1.check_target(path):
            self.send_error(400, "Bad request line")
            return False
        self.request_version = version
        self.close_connection = version_number < (1, 1)
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = http1.read_headers(self.rfile)  # type: ignore[assignment]  # read like one
        except http1.HeadError as exc:
            self.send_error(exc.status, str(exc))
            return False
        conntype = (self.headers.get("Connection") or "").lower()
        if "close" in conntype:
            self.close_connection = True
        elif "keep-alive" in conntype and version_number >= (1, 1):
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if expect == "100-continue" and version_number >= (1, 1):
            return self.handle_expect_100()
        return True

    def _json(self, status: int, payload: Any, *, retry_after: float | None = None) -> None:
        body = json.dumps(payload, sort_keys=True, default=str).encode()
        self._send(status, body, "application/json", retry_after=retry_after)

    def _send(self, status: int, body: bytes, ctype: str, *, retry_after: float | None = None) -> None:
        from metal_guard.serve.replies import retry_after_value

        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after_value(retry_after))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _own_route(self) -> bool:
        path = self.path.split("?", 1)[0]
        if self.command not in ("GET", "HEAD") or path not in OWN_ROUTES:
            return False
        sup = self.server.supervisor
        snap = sup.snapshot()
        child, _, _ = sup.route()
        port = child.port if child is not None else None
        if path == "/health":
            status, body = metrics.health(snap)
            self._json(status, body, retry_after=None if status == 200 else snap["retry_after_sec"])
        elif path == "/metal-guard/status":
            payload = metrics.status_payload(snap, self.server.listen, _breaker_status(), port)
            payload["front"]["idle_connection_threads"] = self.server.threads.idle
            self._json(200, payload)
        else:
            self._send(200, metrics.metrics_text(snap, port).encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        return True

    def _dispatch(self) -> None:
        try:
            if self._own_route():
                return
            try:
                body = proxy.read_body(self, self.server.max_body_bytes)
            except proxy.BodyError as exc:
                proxy.send_error(self, exc.status, str(exc), code="invalid_request",
                                 type="invalid_request_error", close=True)
                return
            child, state, retry_after = self.server.supervisor.route()
            if child is None:
                snap = self.server.supervisor.snapshot()
                reason = snap.get("reason") or state
                proxy.send_error(self, 503, f"the model server is {state}: {reason}",
                                 code=f"server_{state}", retry_after=retry_after)
                return
            sup = self.server.supervisor
            guess = 1.0 if sup.options.standby else (sup.last_time_to_ready_sec or 1.0)
            proxy.forward(self, child, body, timeout=self.server.upstream_timeout,
                          retry_after=guess)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch
