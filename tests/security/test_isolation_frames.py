"""Item 11: no frame, from either side, can hang the parent or the worker.

A prompt over the 64 MiB frame limit used to deadlock both forever: the worker rejected the
header without draining it, both blocked writing to full sockets, ``generate_timeout`` never
fired and the runner's request lock blocked every other thread. Here: real sockets, real
threads, a real worker; every wait is bounded by a generous timeout so a regression fails
instead of hanging.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from metal_guard.errors import SubprocessTimeoutError, WorkerError
from metal_guard.isolation import MLXSubprocessRunner
from metal_guard.isolation import protocol as P
from metal_guard.isolation.runner import RunnerBusyError
from metal_guard.testing import inject_worker_fault, worker_fault_env

FAULTS = worker_fault_env()
#: Upper bound for anything that must merely *finish* (not a speed claim).
GENEROUS = 60.0
BIG = 8 << 20  # far more than a socket pair buffers


def _pair() -> tuple[P.Channel, P.Channel]:
    a, b = socket.socketpair()
    return P.Channel(a, P.PARENT_FRAMES), P.Channel(b, P.PARENT_FRAMES)


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:  # type: ignore[no-untyped-def]
    out: list = []

    def run() -> None:
        try:
            out.append(("ok", fn(*args)))
        except BaseException as exc:  # reported to the test
            out.append(("err", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# --------------------------------------------------------------------------- frame level


def test_two_sides_sending_big_frames_at_once_do_not_deadlock() -> None:
    """Each side sends a frame bigger than the socket buffers, then reads the other's: with
    blocking writes both wait forever for a reader that is itself writing."""
    left, right = _pair()

    def exchange(chan: P.Channel, tag: str) -> str:
        chan.send(P.frame(P.STATS, blob=tag * BIG))
        return str(chan.recv(timeout=GENEROUS)["blob"][:1])

    t1, r1 = _in_thread(exchange, left, "l")
    t2, r2 = _in_thread(exchange, right, "r")
    t1.join(GENEROUS)
    t2.join(GENEROUS)
    assert not t1.is_alive() and not t2.is_alive(), "both senders blocked on each other"
    assert r1 == [("ok", "r")] and r2 == [("ok", "l")]
    left.close()
    right.close()


def test_an_oversize_header_is_reported_once_then_drained_and_the_stream_stays_in_step() -> None:
    a, b = socket.socketpair()
    receiver = P.Channel(b, P.PARENT_FRAMES)
    announced = P.MAX_FRAME_BYTES + 12345
    good = P.encode(P.frame(P.STATS, after="the oversize frame"))

    def hostile_sender() -> None:
        a.sendall(struct.pack("!I", announced))
        a.sendall(b"\x00" * announced)  # blocks unless the receiver drains
        a.sendall(struct.pack("!I", len(good)) + good)

    t, result = _in_thread(hostile_sender)
    with pytest.raises(P.ProtocolError, match="exceeds"):
        receiver.poll(GENEROUS)
    frame = receiver.recv(timeout=GENEROUS)
    t.join(GENEROUS)
    assert not t.is_alive() and result == [("ok", None)]
    assert frame["after"] == "the oversize frame"
    a.close()
    receiver.close()


def test_a_half_sent_frame_never_blocks_poll_or_recv() -> None:
    a, b = socket.socketpair()
    receiver = P.Channel(b, P.PARENT_FRAMES)
    body = P.encode(P.frame(P.STOP))
    a.sendall(struct.pack("!I", len(body)) + body[:3])  # the peer stalls mid-frame
    assert receiver.poll(0.3) is False
    with pytest.raises(TimeoutError):
        receiver.recv(timeout=0.3)
    a.sendall(body[3:])
    assert receiver.recv(timeout=GENEROUS)["type"] == P.STOP
    a.close()
    assert receiver.poll(GENEROUS) is True  # EOF is readable...
    with pytest.raises(EOFError):
        receiver.recv(timeout=GENEROUS)  # ...and reported as such
    receiver.close()


def test_a_send_to_a_peer_that_never_reads_times_out() -> None:
    a, b = socket.socketpair()
    sender = P.Channel(a, P.PARENT_FRAMES, send_timeout=0.5)
    with pytest.raises(P.SendTimeout):
        sender.send(P.frame(P.STATS, blob="y" * BIG))
    # half a frame went out: the channel is closed rather than left out of step
    assert sender.closed
    b.close()


def test_oversize_frames_are_refused_before_a_byte_is_written() -> None:
    a, b = socket.socketpair()
    sender = P.Channel(a, P.PARENT_FRAMES)
    with pytest.raises(P.FrameTooLarge, match="64 MiB"):
        sender.send(P.frame(P.STATS, blob="z" * (P.MAX_FRAME_BYTES + 1)))
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)
    sender.close()
    b.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("payload", [b"[" * 100_000, b"{\"a\":" * 50_000, b"\xff\xfe", b""])
def test_malformed_frames_are_protocol_errors(payload: bytes) -> None:
    a, b = socket.socketpair()
    receiver = P.Channel(b, P.PARENT_FRAMES)
    ok = P.encode(P.frame(P.STOP))
    t, _ = _in_thread(a.sendall, struct.pack("!I", len(payload)) + payload
                      + struct.pack("!I", len(ok)) + ok)
    with pytest.raises(P.ProtocolError):
        receiver.recv(timeout=GENEROUS)
    assert receiver.recv(timeout=GENEROUS)["type"] == P.STOP  # still in step
    t.join(GENEROUS)
    a.close()
    receiver.close()


# --------------------------------------------------------------------------- real worker


@pytest.fixture(scope="module")
def runner(module_home: Path, tiny_model_path: Path) -> Iterator[MLXSubprocessRunner]:
    r = MLXSubprocessRunner(tiny_model_path, env=FAULTS, generate_timeout=GENEROUS,
                            use_lock=False)
    yield r
    r.shutdown()


@pytest.mark.timeout(120)
def test_a_prompt_over_64_mib_is_refused_in_the_parent(runner: MLXSubprocessRunner) -> None:
    pid = runner.worker_pid
    prompt = "a" * (P.MAX_FRAME_BYTES + 1)
    for call in (runner.generate, lambda p: next(iter(runner.stream_generate(p)))):
        with pytest.raises(ValueError, match=r"MAX_FRAME_BYTES = 64 MiB") as info:
            call(prompt)
        assert not isinstance(info.value, WorkerError)
    # messages count too: the encoded request is what must fit
    with pytest.raises(ValueError, match="64 MiB"):
        runner.generate([{"role": "user", "content": "\u00e9" * (P.MAX_FRAME_BYTES // 2 + 1)}])
    # nothing reached the worker: same process, still answering, request lock free
    assert runner.worker_pid == pid
    assert runner.generate("hello", max_tokens=3, temperature=0.0)
    assert runner._request_lock.acquire(blocking=False)
    runner._request_lock.release()


@pytest.mark.timeout(180)
def test_an_oversize_header_from_the_parent_is_drained_by_the_worker(
        runner: MLXSubprocessRunner) -> None:
    runner.generate("warm", max_tokens=2)
    pid = runner.worker_pid
    chan = runner._handle.chan
    assert chan is not None and pid is not None
    announced = P.MAX_FRAME_BYTES + 4096

    def hostile_parent() -> None:
        with chan._send_lock:
            chan.sock.sendall(struct.pack("!I", announced) + b"\x00" * announced)

    t, result = _in_thread(hostile_parent)
    t.join(GENEROUS)
    assert not t.is_alive(), "the worker stopped reading: the parent is stuck writing"
    assert result == [("ok", None)]
    reply = chan.recv(timeout=GENEROUS)
    assert reply["type"] == P.ERROR and reply["phase"] == "protocol"
    assert "exceeds" in reply["message"]
    # exactly one error frame, then the same worker serves a normal request
    assert not chan.poll(0.5)
    assert runner.generate("hello", max_tokens=3, temperature=0.0)
    assert runner.worker_pid == pid


@pytest.mark.timeout(180)
def test_an_oversize_header_from_the_worker_cannot_hang_the_parent(
        runner: MLXSubprocessRunner) -> None:
    runner.generate("warm", max_tokens=2)
    pid = runner.worker_pid
    assert pid is not None
    with pytest.raises(P.ProtocolError, match="exceeds"):
        inject_worker_fault(runner, "bad_frame", timeout=GENEROUS)
    # the untrusted worker was replaced; the next request gets a fresh one
    assert runner.generate("hello", max_tokens=3, temperature=0.0)
    assert runner.worker_pid not in (None, pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(180)
def test_an_open_stream_in_one_thread_does_not_block_another_forever(
        runner: MLXSubprocessRunner) -> None:
    stream = runner.stream_generate("keep going", max_tokens=100_000, temperature=0.0)
    next(iter(stream))  # thread 1 now owns the runner and stops reading
    t, result = _in_thread(lambda: runner.generate("me too", max_tokens=2, timeout=1.0))
    t.join(GENEROUS)
    assert not t.is_alive(), "the second thread is blocked on the request lock"
    kind, err = result[0]
    assert kind == "err" and isinstance(err, RunnerBusyError)
    assert isinstance(err, SubprocessTimeoutError) and "busy" in str(err)
    stream.close()  # the first request is stopped; the worker stays loaded
    assert runner.generate("after", max_tokens=2)


@pytest.mark.timeout(180)
def test_a_worker_that_will_not_take_the_request_times_out(
        runner: MLXSubprocessRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's send is bounded by its timeout too (the worker is stopped here, so
    its socket buffer fills and it never reads)."""
    import os
    import signal

    runner.generate("warm", max_tokens=2)
    pid = runner.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(SubprocessTimeoutError) as info:
            runner.generate("q" * (16 << 20), max_tokens=2, timeout=1.0)
    finally:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # already killed by the timeout
    assert info.value.phase == "send"
    assert time.monotonic() - start < GENEROUS
    assert runner.generate("hello", max_tokens=2)


def test_error_frames_stay_small_even_when_the_exception_quotes_the_prompt() -> None:
    from metal_guard.isolation.worker import ERROR_TEXT_MAX_CHARS, _clip

    text = "x" * (P.MAX_FRAME_BYTES + 10)
    clipped = _clip(text)
    assert len(clipped) < ERROR_TEXT_MAX_CHARS + 100
    assert len(json.dumps({"m": clipped})) < P.MAX_FRAME_BYTES
