"""The parent's frame wait polls once more before it declares a timeout.

A parent descheduled past its deadline (a loaded 2-core box) must take a frame that is
already in the socket buffer instead of killing a healthy worker. Real socketpair, a real
child process standing in for the worker; the clock is the runner's injectable one, set so
that the deadline is already in the past at the first look.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from metal_guard.isolation import protocol as P
from metal_guard.isolation.lifecycle import WorkerLifecycle


class _Stalled(Exception):
    pass


class _Waiter(WorkerLifecycle):
    """Just enough of a runner for ``_next_frame``; a timeout is recorded, not acted on."""

    def __init__(self, step: float) -> None:
        self.model_id = "tiny"
        self._closed = False
        ticks = itertools.count()
        # every reading of the clock is `step` seconds after the previous one: the parent
        # "slept" through the whole wait between computing the deadline and looking at it
        self._clock = lambda: next(ticks) * step
        self.timeouts: list[tuple[int, str]] = []

    def _on_timeout(self, proc, phase, timeout, message=None):  # type: ignore[no-untyped-def]
        self.timeouts.append((proc.pid, phase))
        return _Stalled(phase)


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def pair() -> Iterator[tuple[P.Channel, P.Channel]]:
    a, b = socket.socketpair()
    parent, child = P.Channel(a, P.WORKER_FRAMES), P.Channel(b, P.WORKER_FRAMES)
    yield parent, child
    parent.close()
    child.close()


@pytest.mark.parametrize("wait", [0.0, 5.0])
def test_a_buffered_frame_at_the_deadline_is_delivered(worker, pair, wait: float) -> None:
    parent, child = pair
    child.send(P.frame(P.TOKEN, id=1, text="already here", n=1))
    waiter = _Waiter(step=wait + 100.0)  # the first look is 100 s past the deadline
    fr = waiter._next_frame(worker, parent, wait, phase="generate", timeout=wait)
    assert fr["type"] == P.TOKEN and fr["text"] == "already here"
    assert waiter.timeouts == []
    assert worker.poll() is None  # the worker was left alone


def test_nothing_buffered_past_the_deadline_is_a_timeout(worker, pair) -> None:
    parent, _child = pair
    waiter = _Waiter(step=100.0)
    with pytest.raises(_Stalled):
        waiter._next_frame(worker, parent, 5.0, phase="generate", timeout=5.0)
    assert waiter.timeouts == [(worker.pid, "generate")]


def test_a_frame_arriving_within_the_wait_is_delivered(worker, pair) -> None:
    parent, child = pair
    waiter = _Waiter(step=0.0)  # the clock stands still: only a frame ends the wait
    child.send(P.frame(P.HEARTBEAT, phase="generate"))
    assert waiter._next_frame(worker, parent, 5.0, phase="generate", timeout=5.0)["type"] \
        == P.HEARTBEAT
    assert waiter.timeouts == []
