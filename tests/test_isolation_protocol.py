"""Unit tests of the isolation layer's parts that need no model: frames, request checking,
backoff, memory recovery, the footprint monitor (against real processes) and the B1/C7 helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import GENEROUS_SEC, pid_gone, wait_for

from metal_guard import breadcrumbs
from metal_guard.errors import MetalOOMError, WorkerError
from metal_guard.isolation import protocol as P
from metal_guard.isolation import supervisor as S
from metal_guard.isolation.generation import SAMPLING_KEYS, Model, normalize_backend
from metal_guard.isolation.helpers import (
    gemma4_generation_flush,
    subprocess_inference_guard,
)
from metal_guard.isolation.spawn import WorkerHandle, crash_detail, map_worker_error
from metal_guard.knowledge.families import is_gemma4_family

# ----------------------------------------------------------------------------- frames


def test_frames_round_trip_and_carry_the_version() -> None:
    data = P.encode(P.frame(P.TOKEN, id=3, text="héllo", n=1))
    obj = P.decode(data, P.WORKER_FRAMES)
    assert obj == {"v": P.PROTOCOL_VERSION, "type": "token", "id": 3, "text": "héllo", "n": 1}


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"v": 999, "type": "token", "id": 1, "text": "", "n": 1}', "version mismatch"),
        (b'{"type": "token"}', "version mismatch"),
        (b'{"v": 1, "type": "bogus"}', "unknown frame type"),
        (b'{"v": 1, "type": "token", "id": 1}', "lacks text, n"),
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected an object"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_frames_are_rejected_with_a_reason(payload: bytes, match: str) -> None:
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(payload, P.WORKER_FRAMES)


def test_protocol_error_is_a_worker_error() -> None:
    assert issubclass(P.ProtocolError, WorkerError)


def test_nan_cannot_be_encoded() -> None:
    with pytest.raises(TypeError):
        P.encode(P.frame(P.HEARTBEAT, phase="x", value=float("nan")))


def test_channel_sends_from_many_threads_never_interleave() -> None:
    a, b = socket.socketpair()
    sender = P.Channel(a, P.PARENT_FRAMES)
    receiver = P.Channel(b, P.WORKER_FRAMES)
    big = "x" * 70_000  # larger than a socket buffer: a torn write would corrupt frames

    def send(tid: int) -> None:
        for i in range(20):
            sender.send(P.frame(P.TOKEN, id=tid, text=big, n=i))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    got = [receiver.recv() for _ in range(80)]
    for t in threads:
        t.join()
    assert all(fr["text"] == big for fr in got)
    assert sorted((fr["id"], fr["n"]) for fr in got) == [(t, i) for t in range(4) for i in range(20)]
    sender.close()
    with pytest.raises(EOFError):
        receiver.recv()


def test_channel_reads_queued_frames_from_one_buffer_and_reports_eof() -> None:
    a, b = socket.socketpair()
    sender, receiver = P.Channel(a, P.WORKER_FRAMES), P.Channel(b, P.WORKER_FRAMES)
    assert not receiver.poll(0)
    for i in range(50):
        sender.send(P.frame(P.TOKEN, id=1, text=f"t{i}", n=i))
    assert receiver.poll(0)
    assert [receiver.recv()["text"] for _ in range(50)] == [f"t{i}" for i in range(50)]
    sender.sock.sendall(b"\x00\x00")  # half a header, then the peer dies
    sender.close()
    assert receiver.poll(1.0)  # EOF is readable
    with pytest.raises(EOFError):
        receiver.recv()
    receiver.close()
    with pytest.raises(OSError):
        receiver.poll(0)


def test_channel_rejects_an_oversized_frame_header() -> None:
    a, b = socket.socketpair()
    receiver = P.Channel(b, P.WORKER_FRAMES)
    a.sendall((P.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        receiver.recv()
    a.close()
    receiver.close()


# ----------------------------------------------------------------------------- requests


def _req(**kw: object) -> dict:
    base: dict = dict(backend="mlx-lm", max_tokens=8, temperature=0.0, system=None, seed=None,
                      images=None, apply_chat_template=True, extra=None, sampling={},
                      sampling_keys=SAMPLING_KEYS)
    base.update(kw)
    prompt = base.pop("prompt", "hi")
    return P.generate_request(prompt, **base)


def test_generate_request_keeps_every_sampling_argument() -> None:
    req = _req(temperature=0.7, seed=5, system="be brief",
               sampling={"top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.3,
                         "logit_bias": {7: -2}})
    assert req["type"] == "generate" and req["temperature"] == 0.7 and req["seed"] == 5
    assert req["top_p"] == 0.9 and req["top_k"] == 40 and req["min_p"] == 0.05
    assert req["repetition_penalty"] == 1.3 and req["logit_bias"] == {"7": -2.0}
    assert req["system"] == "be brief"


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens"),
        ({"max_tokens": True}, TypeError, "max_tokens"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"sampling": {"top_p": 1.5}}, ValueError, "top_p"),
        ({"sampling": {"top_k": 1.5}}, TypeError, "top_k"),
        ({"sampling": {"temprature": 0.1}}, TypeError, "unknown generation argument"),
        ({"sampling": {"logit_bias": [1, 2]}}, TypeError, "logit_bias"),
        ({"seed": -1}, ValueError, "seed"),
        ({"system": 5}, TypeError, "system"),
        ({"prompt": 42}, TypeError, "prompt"),
        ({"prompt": [{"content": "no role"}]}, TypeError, "prompt"),
        ({"prompt": []}, TypeError, "prompt"),
        ({"images": "cat.png"}, ValueError, "mlx-vlm"),
        ({"backend": "mlx-vlm", "sampling": {"xtc_probability": 0.5}}, ValueError,
         "does not support xtc_probability"),
        ({"extra": {"fn": object()}}, TypeError, "JSON"),
    ],
)
def test_generate_request_rejects_bad_input(kw: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        _req(**kw)


def test_generate_request_images_and_messages() -> None:
    req = _req(backend="mlx-vlm", images=Path("/tmp/a.png"),
               prompt=[{"role": "user", "content": "describe"}])
    assert req["images"] == ["/tmp/a.png"]
    assert req["prompt"] == [{"role": "user", "content": "describe"}]
    assert _req(backend="mlx-vlm", images=["a.png", "b.png"])["images"] == ["a.png", "b.png"]


@pytest.mark.parametrize(("name", "want"), [("mlx", "mlx-lm"), ("mlx_lm", "mlx-lm"),
                                            ("MLX-VLM", "mlx-vlm"), ("vlm", "mlx-vlm")])
def test_backend_aliases(name: str, want: str) -> None:
    assert normalize_backend(name) == want


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        normalize_backend("torch")


# ----------------------------------------------------------------------------- policy


def test_backoff_is_exponential_and_capped() -> None:
    delays = [S.backoff_delay(n, base_sec=0.25, max_sec=3.0) for n in range(7)]
    assert delays == [0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert S.backoff_delay(10_000) == 30.0


def test_memory_recovery_waits_until_back_near_baseline() -> None:
    now = [0.0]
    readings = iter([10, 40, 80, 95])
    sleeps: list[float] = []

    def sleep(sec: float) -> None:
        sleeps.append(sec)
        now[0] += sec

    ok = S.wait_for_memory_recovery(100, timeout_sec=5, tolerance_bytes=10,
                                    read=lambda: next(readings), clock=lambda: now[0],
                                    sleep=sleep, poll_sec=0.1)
    assert ok and len(sleeps) == 3


def test_memory_recovery_wait_is_bounded() -> None:
    now = [0.0]

    def sleep(sec: float) -> None:
        now[0] += sec

    ok = S.wait_for_memory_recovery(100, timeout_sec=2.0, tolerance_bytes=0, read=lambda: 1,
                                    clock=lambda: now[0], sleep=sleep, poll_sec=0.25)
    assert not ok and 2.0 <= now[0] <= 2.3
    assert S.wait_for_memory_recovery(None, timeout_sec=1, tolerance_bytes=0, read=lambda: 0)


def test_default_footprint_limit_uses_the_lowest_known_ceiling() -> None:
    limit = S.default_footprint_limit({"recommended_working_set_bytes": 1 << 30})
    assert limit == 1 << 30
    assert S.default_footprint_limit(None) is None or S.default_footprint_limit(None) > 1 << 30


# ----------------------------------------------------------------------------- processes

_IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(60)"


def _child(code: str, *, own_group: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            process_group=0 if own_group else None)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
    return proc


def test_signal_group_kills_the_workers_whole_group() -> None:
    code = ("import subprocess, time; c = subprocess.Popen(['sleep', '60']); "
            "print(c.pid, flush=True); print('ok', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            process_group=0)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ok"
    assert S.signal_group(proc.pid, signal.SIGKILL)
    assert proc.wait(GENEROUS_SEC) == -signal.SIGKILL
    assert pid_gone(grandchild), "the grandchild survived the process-group kill"
    assert not S.signal_group(proc.pid, signal.SIGKILL)  # reaped: nothing left to signal


def test_signal_group_never_signals_our_own_group() -> None:
    proc = _child("import time; print('ok', flush=True); time.sleep(60)", own_group=False)
    assert os.getpgid(proc.pid) == os.getpgrp()
    assert S.signal_group(proc.pid, signal.SIGTERM)  # must hit the child only: we are alive
    assert proc.wait(GENEROUS_SEC) == -signal.SIGTERM


class _Samples:
    """The sampler of a test monitor: ``values`` in turn, then the last one forever (or what
    ``on_stop`` sets); counts the samples taken, so a test waits for them rather than a time."""

    def __init__(self, values: list[int | None]) -> None:
        self._values = iter(values)
        self.last: int | None = values[-1]
        self.taken = 0

    def __call__(self, _pid: int) -> int | None:
        self.taken += 1
        return next(self._values, self.last)


def _monitor(proc: subprocess.Popen[str], samples: _Samples, actions: list[str],
             on_stop: object = None) -> S.FootprintMonitor:
    def request_stop(reason: str) -> None:
        actions.append("request_stop")
        if callable(on_stop):
            on_stop(samples)

    return S.FootprintMonitor(
        proc.pid, limit=lambda: 1000, is_alive=lambda: proc.poll() is None,
        request_stop=request_stop, on_breach=lambda reason, action: actions.append(action),
        interval_sec=0.02, breaches=2, grace_sec=0.3, sample=samples)


def test_footprint_monitor_escalates_stop_sigterm_sigkill() -> None:
    proc = _child(_IGNORE_TERM)
    actions: list[str] = []
    mon = _monitor(proc, _Samples([5000]), actions).start()
    try:
        assert proc.wait(GENEROUS_SEC) == -signal.SIGKILL
    finally:
        mon.stop()
    assert actions == ["stop", "request_stop", "sigterm", "sigkill"]
    assert mon.peak_bytes == 5000


def test_footprint_monitor_stops_at_sigterm_when_it_works() -> None:
    proc = _child("import time; print('ok', flush=True); time.sleep(60)")
    actions: list[str] = []
    mon = _monitor(proc, _Samples([5000]), actions).start()
    try:
        assert proc.wait(GENEROUS_SEC) == -signal.SIGTERM
    finally:
        mon.stop()
    assert actions == ["stop", "request_stop", "sigterm"]


def test_footprint_monitor_cooperative_stop_spares_the_worker() -> None:
    proc = _child(_IGNORE_TERM)
    actions: list[str] = []
    freed_at: list[int] = []

    def freed(samples: _Samples) -> None:
        samples.last = 10  # the worker released its memory when asked
        freed_at.append(samples.taken)

    samples = _Samples([5000])
    mon = _monitor(proc, samples, actions, on_stop=freed).start()
    try:
        # well past the grace period's samples: it would have escalated by now
        wait_for(lambda: freed_at and samples.taken >= freed_at[0] + 40,
                 what="40 samples after the worker freed its memory")
        mon.stop()
        assert proc.poll() is None
        assert actions == ["stop", "request_stop"]
    finally:
        mon.stop()
        proc.kill()
        proc.wait()


def test_footprint_monitor_ignores_unusable_and_isolated_samples() -> None:
    proc = _child(_IGNORE_TERM)
    actions: list[str] = []
    # unusable samples neither count as a breach nor reset one; a good sample resets
    values: list[int | None] = [None, None, 5000, None, 10, 5000, 10, None]
    samples = _Samples(values * 3 + [10])
    mon = _monitor(proc, samples, actions).start()
    try:
        wait_for(lambda: samples.taken > len(values) * 3 + 5,
                 what="the monitor to take every sample of the sequence")
        mon.stop()
        assert actions == [] and proc.poll() is None
    finally:
        mon.stop()
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- errors


OOM = ("[METAL] Command buffer execution failed: Insufficient Memory "
       "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")


def test_worker_oom_text_becomes_metal_oom_error_with_the_worker_traceback() -> None:
    tb = f'Traceback (most recent call last):\n  File "w.py", line 1\nRuntimeError: {OOM}\n'
    err = map_worker_error("m", {"exc_type": "RuntimeError", "message": OOM, "traceback": tb},
                           stop_reason=None, pid=42)
    assert isinstance(err, MetalOOMError) and isinstance(err, MemoryError)
    assert err.error_class is not None and err.error_class.name == "cmd_buffer_oom"
    assert err.worker_traceback == tb  # type: ignore[attr-defined]
    assert any("worker traceback (pid 42)" in n for n in err.__notes__)


def test_other_worker_exceptions_become_worker_error() -> None:
    err = map_worker_error("m", {"exc_type": "KeyError", "message": "'x'", "traceback": "tb"},
                           stop_reason=None, pid=1)
    assert type(err) is WorkerError and err.exc_type == "KeyError"
    assert err.worker_traceback == "tb" and "KeyError in the worker for 'm'" in str(err)


def test_a_stop_we_asked_for_is_a_metal_oom_error() -> None:
    err = map_worker_error("m", {"exc_type": "GenerationStopped", "message": "x"},
                           stop_reason="footprint 9 GB exceeded the hard limit 8 GB", pid=1)
    assert isinstance(err, MetalOOMError) and "exceeded the hard limit" in str(err)


def test_crash_detail_ends_with_the_telling_line(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("loading\nFatal Python error: Segmentation fault\n\nThread 0x1:\n  File x\n"
                   "Extension modules: numpy (total: 1)\n")
    handle = WorkerHandle()
    handle.log_path = log
    assert crash_detail(handle).splitlines()[-1] == "Fatal Python error: Segmentation fault"
    handle.kill_reason = "killed by metal-guard (sigkill): footprint"
    assert crash_detail(handle).splitlines()[-1] == handle.kill_reason


# ----------------------------------------------------------------------------- helpers


def test_inference_guard_orders_mlx_steps_and_writes_pre_post(monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard import backend

    calls: list[str] = []
    monkeypatch.setattr(backend, "clear_cache", lambda load=False: calls.append("clear") or True)

    def sync(load: bool = False) -> bool:
        calls.append("sync")
        raise RuntimeError("deferred GPU error")  # best effort: logged, not raised

    monkeypatch.setattr(backend, "synchronize", sync)
    with subprocess_inference_guard("org/model-x"):
        calls.append("body")
    assert calls == ["clear", "body", "sync", "clear"]
    crumbs = [b for b in breadcrumbs.tail(10) if b.tag.startswith("SUBPROC")]
    assert [b.tag for b in crumbs] == ["SUBPROC_PRE", "SUBPROC_POST"]
    assert all(b.payload == "org/model-x" and b.meta["pid"] == str(os.getpid()) for b in crumbs)
    assert float(crumbs[0].meta["create_time"]) > 0 and crumbs[1].meta["outcome"] == "ok"


def test_inference_guard_writes_post_when_the_body_fails() -> None:
    with pytest.raises(ValueError, match="boom"), subprocess_inference_guard("m"):
        raise ValueError("boom")
    last = breadcrumbs.tail(1)[0]
    assert last.tag == "SUBPROC_POST" and last.meta["outcome"] == "error"


@pytest.mark.parametrize(("model", "want"), [
    ("mlx-community/gemma-4-31b-it-4bit", True), ("google/gemma4-e4b", True),
    ("/models/Gemma_4_12B", True), ("gemma-3-27b-it", False), ("gemma-42x", False),
    ("llama-4", False), ("mlx-community/gemma-4b-it", False),
])
def test_gemma4_family(model: str, want: bool) -> None:
    assert is_gemma4_family(model) is want


def test_gemma4_flush_only_before_the_first_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    assert gemma4_generation_flush("gemma-4-31b", 0, sleep=slept.append)
    assert slept == [3.0]
    assert [b.tag for b in breadcrumbs.tail(2)] == ["GEMMA4_FLUSH", "GEMMA4_FLUSH_DONE"]
    assert not gemma4_generation_flush("gemma-4-31b", 1, sleep=slept.append)
    assert not gemma4_generation_flush("qwen3-8b", 0, sleep=slept.append)
    monkeypatch.setenv("METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC", "0.5")
    assert gemma4_generation_flush("gemma-4-e4b", 0, sleep=slept.append)
    assert slept == [3.0, 0.5]
    monkeypatch.setenv("METALGUARD_GEMMA4_FIRSTGEN_DISABLED", "1")
    assert not gemma4_generation_flush("gemma-4-e4b", 0, sleep=slept.append)
    assert slept == [3.0, 0.5]


def test_test_faults_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard.settings import get_settings

    assert get_settings().worker_test_faults is False
    monkeypatch.setenv("METALGUARD_WORKER_TEST_FAULTS", "1")
    assert get_settings().worker_test_faults is True


def test_worker_ignores_a_stop_meant_for_an_earlier_request() -> None:
    from metal_guard.isolation.generation import GenerationStopped
    from metal_guard.isolation.worker import Worker, WorkerConfig

    parent_end, worker_end = socket.socketpair()
    parent = P.Channel(parent_end, P.WORKER_FRAMES)
    worker = Worker(WorkerConfig(model_id="m"), P.Channel(worker_end, P.PARENT_FRAMES))
    worker.current_id = 7
    parent.send(P.frame(P.STOP, id=6, reason="late"))
    worker.check_interrupt()  # not ours: ignored
    parent.send(P.frame(P.STATS))
    worker.check_interrupt()  # kept for after the request
    assert [m["type"] for m in worker.pending] == ["stats"]
    parent.send(P.frame(P.STOP, id=7, reason="footprint"))
    with pytest.raises(GenerationStopped, match="footprint"):
        worker.check_interrupt()
    parent.send(P.frame(P.SHUTDOWN))
    with pytest.raises(GenerationStopped, match="shutting down"):
        worker.check_interrupt()
    assert worker.pending[-1]["type"] == "shutdown"  # served once the request has ended


class _Step:
    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


@pytest.mark.parametrize(("last", "want"), [
    (_Step(finish_reason="length", generation_tokens=8), "length"),
    (_Step(finish_reason="stop"), "stop"),
    (_Step(finish_reason=None), None),          # the library gave no reason: none is invented
    (_Step(), None),
    (None, None),                               # nothing generated at all
    (_Step(finish_reason=""), None),
    (_Step(finish_reason="x" * 500), None),     # not passed on unbounded
    (_Step(finish_reason="len\ngth"), None),
    (_Step(finish_reason=7), None),
])
def test_done_frame_carries_the_real_finish_reason(last: object, want: str | None) -> None:
    assert Model.summary(last, 0)["finish_reason"] == want
