"""One server child: start it on a private port, pump its output, see it ready, stop it.

A child is started through :mod:`.trampoline` (its life tied to the front's), in its own
process group, with the same environment ``metal-guard run`` gives (the adapters active).
Three daemon threads per child: the output pump (log file + in-memory tail), the waiter
(reaps the process and posts ``("died", child)``) and the readiness prober (posts
``("ready", child)`` or ``("not_ready", child, reason)``).

Readiness: ``GET /health`` answers 200, then (when the command names a model) a one-token
completion succeeds, so "ready" means "the model is loaded and generates".
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from metal_guard.serve.logsink import LogSink, Tail

log = logging.getLogger("metal_guard.serve.child")

__all__ = ["Child", "free_port"]

PROBE_INTERVAL_SEC = 0.1
PROBE_TIMEOUT_SEC = 2.0
#: The pump pauses this long after a read shorter than PUMP_FULL_READ, to gather log lines.
PUMP_GATHER_SEC = 0.02
PUMP_FULL_READ = 65536


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _signal_group(pid: int, sig: int) -> None:
    """Signal the child's process group (it leads one), never ours."""
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return
    with contextlib.suppress(OSError):
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)


class Child:
    """A server child process. ``role`` is informational ("active" / "standby")."""

    def __init__(self, number: int, argv: list[str], port: int, *, env: dict[str, str],
                 sink: LogSink, events: queue.Queue[tuple[Any, ...]], model_id: str,
                 warmup: bool, ready_timeout: float, watch: str = "auto") -> None:
        self.number = number
        self.argv = argv
        self.port = port
        self.env = env
        self.sink = sink
        self.events = events
        self.model_id = model_id
        self.warmup = warmup
        self.ready_timeout = ready_timeout
        self.watch = watch
        self.role = "active"
        self.tail = Tail()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # monotonic
        self.ready_at: float | None = None
        self.exitcode: int | None = None
        self.crash: Any = None  # SubprocessCrashError once classified
        self.stopping = False  # we asked it to stop: its death is not a crash
        self.died = threading.Event()
        self.ready = threading.Event()
        self._pipe_w: int | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ facts

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def time_to_ready_sec(self) -> float | None:
        if self.ready_at is None or self.started_at is None:
            return None
        return round(self.ready_at - self.started_at, 3)

    def alive(self) -> bool:
        return self.proc is not None and not self.died.is_set()

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Start the process and its threads (returns at once)."""
        r, w = os.pipe()
        os.set_inheritable(w, False)
        argv = [sys.executable, "-m", "metal_guard.serve.trampoline", "--ppid", str(os.getpid()),
                "--fd", str(r), "--watch", self.watch, "--", *self.argv]
        self.sink.write(f"=== metal-guard serve: child #{self.number} on port {self.port}: "
                        f"{' '.join(self.argv)[:2000]}\n".encode())
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=self.env, close_fds=True,
                                         pass_fds=(r,), process_group=0)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._pipe_w = w
        self.started_at = time.monotonic()
        for target, name in ((self._pump, "pump"), (self._wait, "wait"), (self._probe, "probe")):
            t = threading.Thread(target=target, daemon=True,
                                 name=f"metal-guard-serve-{name}-{self.number}")
            self._threads.append(t)
            t.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, PUMP_FULL_READ)
            except OSError:
                break
            if not data:
                break
            self.tail.feed(data)
            self.sink.write(data)
            if len(data) < PUMP_FULL_READ:
                # A server logs a few lines per request; waking for each costs the front CPU
                # on every request. Let a short pause gather them (the pipe holds 64 KiB).
                time.sleep(PUMP_GATHER_SEC)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()

    def _wait(self) -> None:
        assert self.proc is not None
        self.exitcode = self.proc.wait()
        self._close_pipe()
        self.died.set()
        self.events.put(("died", self))

    # ------------------------------------------------------------------ readiness

    def _get(self, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=PROBE_TIMEOUT_SEC)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read(65536)
            return resp.status
        finally:
            conn.close()

    def _warm(self) -> int:
        body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=max(5.0, self.ready_timeout))
        try:
            conn.request("POST", "/v1/completions", body,
                         {"Content-Type": "application/json", "Content-Length": str(len(body))})
            resp = conn.getresponse()
            resp.read(1 << 20)
            return resp.status
        finally:
            conn.close()

    def _probe(self) -> None:
        assert self.started_at is not None
        deadline = self.started_at + self.ready_timeout
        while time.monotonic() < deadline:
            if self.died.wait(PROBE_INTERVAL_SEC):
                return  # the waiter reports the death
            if self.stopping:
                return
            try:
                status = self._get("/health")
            except (OSError, http.client.HTTPException):
                continue
            if status != 200:
                continue
            if self.warmup:
                try:
                    status = self._warm()
                except (OSError, http.client.HTTPException) as exc:
                    if self.died.is_set():
                        return
                    log.debug("child #%d warm-up failed: %s", self.number, exc)
                    continue
                if status != 200:
                    if status == 503:
                        continue  # still loading (the guarded server answers 503 + Retry-After)
                    self.events.put(("not_ready", self, f"warm-up completion answered {status}"))
                    return
            self.ready_at = time.monotonic()
            self.ready.set()
            self.events.put(("ready", self))
            return
        if not self.died.is_set() and not self.stopping:
            self.events.put(("not_ready", self,
                             f"not ready within {self.ready_timeout:g}s (see the serve log)"))

    # ------------------------------------------------------------------ stop

    def signal(self, sig: int) -> None:
        if self.proc is not None and not self.died.is_set():
            _signal_group(self.proc.pid, sig)

    def stop(self, grace_sec: float) -> int | None:
        """SIGTERM the group, ``grace_sec`` to exit, then SIGKILL; reap; join the threads."""
        self.stopping = True
        if self.proc is None:
            return None
        if not self.died.is_set():
            self.signal(signal.SIGTERM)
            if not self.died.wait(max(0.0, grace_sec)):
                self.signal(signal.SIGKILL)
                self.died.wait(10.0)
        self._join()
        return self.exitcode

    def _join(self) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
        self._close_pipe()

    def _close_pipe(self) -> None:
        w, self._pipe_w = self._pipe_w, None
        if w is not None:
            with contextlib.suppress(OSError):
                os.close(w)

    def reap_threads(self) -> None:
        """After the death was handled: wait for the pump to drain (bounded)."""
        self._join()

    # ------------------------------------------------------------------ classification

    def classify(self) -> Any:
        """The death as a :class:`~metal_guard.errors.SubprocessCrashError` (class, signal)."""
        from metal_guard.errors import SubprocessCrashError

        for t in self._threads:  # the pump may still hold the last words
            if t.name.startswith("metal-guard-serve-pump"):
                t.join(timeout=2.0)
        detail = _headline(self.tail.text())
        self.crash = SubprocessCrashError(self.model_id, self.exitcode, detail)
        return self.crash


def _headline(tail: str) -> str:
    """The log tail with its most telling line last (what the error message shows)."""
    from metal_guard.classify import classify_mlx_error

    text = tail.strip()
    if not text:
        return ""
    lines = text.splitlines()
    for line in reversed(lines):
        stripped = line.strip()
        if stripped.startswith("Fatal Python error") or (stripped and classify_mlx_error(stripped)):
            return text + "\n" + stripped
    return text
