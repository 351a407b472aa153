"""Ordering between the generation thread and the HTTP threads of the guarded ``mlx_lm.server``.

The races these tests pin down showed only under CPU contention (busy processes beside the
suite); here each one is staged deterministically instead:

* a request the generation thread took while metal-guard was switched off (``uninstall()`` /
  ``install()`` around a running server) was unknown to the OOM supervisor: after an OOM its
  client waited forever. Requests are now tracked by the request queue itself, for as long as
  the supervisor runs.
* the OOM recovery wrote its breadcrumb after answering 503, and the sequential path dropped the
  prompt cache after the client already had its 503: a client reading them right after its
  answer saw the old state.
* a request's ``keep_alive`` took effect when its handler finished writing, after the client
  could already read ``/metal-guard/status``.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
from typing import Any

import pytest

pytest.importorskip("mlx_lm.server")

from server_support import Server

from metal_guard import installer as mg
from metal_guard.adapters import mlx_lm_server as adapter
from metal_guard.adapters._server_recovery import recover
from metal_guard.adapters._server_state import (
    ServerState,
    TrackedQueue,
    TrackingRequests,
    reject_queued,
    request_local,
    track_requests,
)
from metal_guard.breadcrumbs import read_lines


class Inbox:
    """A response queue that runs ``check`` at the moment an item is delivered to it."""

    def __init__(self, check: Any = None) -> None:
        self.items: list[Any] = []
        self.check = check
        self.seen_at_delivery: list[Any] = []

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if self.check is not None:
            self.seen_at_delivery.append(self.check(item))
        self.items.append(item)


# --------------------------------------------------------------------------- request tracking


def test_request_queue_tracks_what_the_generation_thread_takes() -> None:
    state = ServerState()
    generator = type("G", (), {})()
    generator.requests = queue.Queue()
    early = Inbox()
    generator.requests.put((early, "queued before the swap", None))
    assert track_requests(generator, state) and isinstance(generator.requests, TrackingRequests)
    assert track_requests(generator, state)  # a restarted loop: same queue, still tracking

    def client() -> None:  # an HTTP thread queues a request with its keep_alive
        request_local.keep_alive = 7.0
        generator.requests.put((Inbox(), "request", None))

    thread = threading.Thread(target=client)
    thread.start()
    thread.join()
    assert state.live_requests() == []  # queued, not taken: no OOM of the loop concerns it

    first = generator.requests.get_nowait()
    second = generator.requests.get_nowait()
    assert isinstance(first[0], TrackedQueue) and first[0].queue is early
    assert isinstance(second[0], TrackedQueue) and second[0].keep_alive == 7.0
    assert set(state.live_requests()) == {first[0], second[0]}
    second[0].put(None)  # answered: no longer live
    assert state.live_requests() == [first[0]]
    assert state.request_keep_alive == 7.0

    not_a_queue = type("H", (), {"requests": queue.LifoQueue()})()
    assert track_requests(not_a_queue, state) is False  # left alone: the wrapper tracks instead


def test_keep_alive_takes_effect_before_the_last_item_reaches_the_client() -> None:
    state = ServerState()
    inbox = Inbox(check=lambda item: state.request_keep_alive)
    tracked = TrackedQueue(inbox, state, keep_alive=300.0)
    tracked.put("a token")
    tracked.put(None)
    assert inbox.seen_at_delivery == [None, 300.0]  # set before the None was delivered
    tracked.put(None)  # a second terminal item changes nothing
    assert state.request_keep_alive == 300.0


def test_a_held_error_is_delivered_only_on_release() -> None:
    state = ServerState()
    inbox = Inbox()
    tracked = TrackedQueue(inbox, state)
    tracked.hold = True
    tracked.put("ctx")
    error = RuntimeError("boom")
    tracked.put(error)
    assert inbox.items == ["ctx"] and tracked.failure is error and not tracked.live
    tracked.release()
    tracked.release()
    assert inbox.items == ["ctx", error]
    tracked.put(ValueError("later"))  # no longer holding
    assert isinstance(inbox.items[-1], ValueError)


def test_reject_queued_answers_every_waiting_request() -> None:
    generator = type("G", (), {})()
    generator.requests = queue.Queue()
    inboxes = [Inbox() for _ in range(3)]
    for inbox in inboxes:
        generator.requests.put((inbox, None, None))
    generator.requests.put("not a request tuple")  # skipped, never raises
    assert reject_queued(generator, lambda: RuntimeError("not now")) == 3
    assert all(isinstance(inbox.items[0], RuntimeError) for inbox in inboxes)
    assert generator.requests.empty()
    assert reject_queued(None, lambda: RuntimeError()) == 0


def test_oom_record_and_cleanup_come_before_the_503() -> None:
    """A client that got its 503 finds the breadcrumb already written."""
    state = ServerState()

    def seen(item: Any) -> Any:
        return [line for line in read_lines(50) if "SERVER_OOM_RECOVERED" in line]

    inboxes = [Inbox(check=seen) for _ in range(2)]
    tracked = [TrackedQueue(inbox, state) for inbox in inboxes]
    for queue_ in tracked:
        state.track(queue_)
    done = TrackedQueue(Inbox(), state)
    state.track(done)
    done.put(None)  # finished before the OOM: not answered again
    recover(None, state, RuntimeError(adapter.SIMULATED_OOM))
    for inbox in inboxes:
        assert len(inbox.items) == 1 and "Metal OOM" in str(inbox.items[0])
        crumbs = inbox.seen_at_delivery[0]
        assert crumbs and "answered_503=2" in crumbs[-1]


# --------------------------------------------------------------------------- on a real server


def _stream(port: int, body: dict[str, Any], first_chunk: threading.Event,
            out: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        data = b""
        while True:
            line = resp.readline()
            if not line:
                break
            data += line
            if line.startswith(b"data: "):
                first_chunk.set()
        out["data"] = data
    except Exception as exc:  # a timeout here is the hang this test is about
        out["error"] = exc
    finally:
        first_chunk.set()
        conn.close()


def test_request_taken_while_switched_off_is_answered_after_an_oom(
        shared_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generation thread takes a request while metal-guard is uninstalled (the state of a
    ``_next_request`` call already running when ``install()`` returns); an OOM of the batch it
    is in must still end its stream, not leave it waiting forever."""
    first_chunk = threading.Event()
    out: dict[str, Any] = {}
    # Uninstalled here (module_server). A ``_next_request`` call that began while metal-guard was
    # installed may still be waiting for work: wait until the generation thread has started a
    # new one (each begins with ``requests.get``), so the request below is taken by a call made
    # without any wrapper active.
    requests = shared_server.generator.requests
    started = threading.Event()

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.set()
        return type(requests).get(requests, *args, **kwargs)

    requests.get = spy
    try:
        assert started.wait(60)
    finally:
        del requests.get
    thread = threading.Thread(target=_stream, args=(shared_server.port, {
        "prompt": "a long answer", "max_tokens": 3000, "stream": True}, first_chunk, out))
    thread.start()
    try:
        assert first_chunk.wait(120) and "error" not in out, out
        monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "1")
        mg.install()
        try:
            status, body = shared_server.complete("joins the batch and fails")
        finally:
            mg.uninstall()
        assert status == 503 and body["error"]["code"] == "metal_oom"
        thread.join(timeout=120)
        assert not thread.is_alive(), "the stream taken while uninstalled never ended"
        assert "error" not in out, out
        # it was cut by the OOM (mlx_lm.server's own handler ran it: the connection ends early)
        assert b"data: [DONE]" not in out["data"]
        recovered = [line for line in read_lines(100) if "SERVER_OOM_RECOVERED" in line]
        assert recovered and "answered_503=2" in recovered[-1], recovered
    finally:
        thread.join(timeout=180)
    monkeypatch.delenv("METALGUARD_TEST_SERVER_OOM_EVERY")
    mg.install()
    try:
        assert shared_server.complete("served again")[0] == 200
    finally:
        mg.uninstall()


def test_status_right_after_an_answer_shows_its_keep_alive(shared_server: Server) -> None:
    mg.install()
    try:
        for value, expected in (("5m", 300.0), (2.5, 2.5), (None, -1.0), ("1h", 3600.0)):
            extra = {} if value is None else {"keep_alive": value}
            assert shared_server.complete("keep", **extra)[0] == 200
            assert shared_server.status()["server"]["keep_alive_sec"] == expected, value
        status, _h, raw = shared_server.request("/v1/completions", {
            "prompt": "x", "max_tokens": 2, "stream": True, "keep_alive": "2m"})
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
        assert shared_server.status()["server"]["keep_alive_sec"] == 120.0
        assert shared_server.complete("back to the default")[0] == 200
    finally:
        mg.uninstall()
