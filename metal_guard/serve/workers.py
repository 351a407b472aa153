"""Threads for the front's connections, kept for reuse instead of one new thread each.

``ThreadingHTTPServer`` starts a thread per connection; for clients that open a connection per
request (most HTTP libraries against a server that closes, as ``mlx_lm.server`` does) starting
it was about a fifth of the front's CPU per request. :class:`ThreadCache` hands a connection
to an idle thread when there is one and starts a thread otherwise, so a burst of any size is
still served at once (no queueing behind a fixed pool); a thread idle for ``idle_sec``, or
beyond ``max_idle`` idle ones, ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadCache"]


class ThreadCache:
    def __init__(self, run: Callable[..., None], *, idle_sec: float = 30.0,
                 max_idle: int = 16, name: str = "metal-guard-serve-conn") -> None:
        self._run = run
        self._idle_sec = idle_sec
        self._max_idle = max_idle
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._closed = False

    @property
    def idle(self) -> int:
        with self._lock:
            return self._idle

    def submit(self, *args: Any) -> None:
        """Run ``run(*args)`` in an idle thread, or in a new one when none is idle."""
        with self._lock:
            if self._closed:
                raise RuntimeError("thread cache closed")
            if self._idle:
                self._idle -= 1
                self._jobs.put(args)
                return
        threading.Thread(target=self._loop, args=(args,), daemon=True, name=self._name).start()

    def _loop(self, job: tuple[Any, ...] | None) -> None:
        while job is not None:
            self._run(*job)
            job = self._next()

    def _next(self) -> tuple[Any, ...] | None:
        with self._lock:
            if self._closed or self._idle >= self._max_idle:
                return None
            self._idle += 1
        try:
            return self._jobs.get(timeout=self._idle_sec)
        except queue.Empty:
            with self._lock:
                # ``submit`` counts an idle thread down and queues the job under this lock, so
                # a job queued now was meant for one of the idle threads: take it.
                try:
                    return self._jobs.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return None

    def close(self) -> None:
        """No new jobs; idle threads end now, busy ones after their job."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)
