"""Real faults in real workers: typed crash errors, stalls, respawn, breaker, memory limits.

Every fault here really happens in the worker process — SIGKILL from outside, ``os.abort()``,
a 1 TiB ``mx.zeros`` (SIGSEGV on the CPU build), SIGSTOP, real allocations over a footprint
limit — and the test then checks that a respawned worker answers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import wait_for

from metal_guard import breadcrumbs
from metal_guard.errors import (
    MetalOOMError,
    MLXCooldownActive,
    SubprocessCrashError,
    SubprocessTimeoutError,
)
from metal_guard.isolation import MLXSubprocessRunner
from metal_guard.testing import inject_worker_fault, worker_fault_env

FAULTS = worker_fault_env()
#: The default suite runs 20 crash/respawn cycles; set this to 200 for the long run.
CYCLES = int(os.environ.get("METALGUARD_TEST_CRASH_CYCLES", "20"))


@pytest.fixture(scope="module")
def crasher(module_home: Path, tiny_model_path: Path) -> Iterator[MLXSubprocessRunner]:
    """A worker that honours debug faults; tests crash it and expect a respawn."""
    r = MLXSubprocessRunner(tiny_model_path, env=FAULTS, footprint_interval_sec=0.1)
    yield r
    r.shutdown()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _exited(pid: int) -> bool:
    """Our child has fully exited (all threads, not merely a zombie group leader on Linux);
    peeks without reaping it."""
    if hasattr(os, "waitid"):
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return _gone(pid)


def _crumbs(tag: str) -> list[breadcrumbs.Breadcrumb]:
    return [b for b in breadcrumbs.tail(500) if b.tag == tag]


def _kill_mid_stream(runner: MLXSubprocessRunner) -> None:
    stream = runner.stream_generate("keep going", max_tokens=1_000_000, temperature=0.0)
    next(stream)
    assert runner.worker_pid is not None
    os.kill(runner.worker_pid, signal.SIGKILL)
    for _ in stream:
        pass


@pytest.mark.parametrize(
    ("fault", "sig", "cls"),
    [("sigkill", "SIGKILL", "worker_killed"),
     ("abort", "SIGABRT", "process_abort"),
     ("huge_alloc", "SIGSEGV", "worker_segfault")],
)
def test_real_fault_is_a_typed_crash_and_a_respawned_worker_answers(
        crasher: MLXSubprocessRunner, fault: str, sig: str, cls: str) -> None:
    from metal_guard.breaker import CircuitBreaker

    old = crasher.worker_pid
    crashes = crasher.crash_count
    assert old is not None
    with pytest.raises(SubprocessCrashError) as info:
        if fault == "sigkill":
            _kill_mid_stream(crasher)
        else:
            inject_worker_fault(crasher, fault)
    err = info.value
    assert err.exitcode == -getattr(signal, sig) and err.signal == sig
    assert err.error_class is not None and err.error_class.name == cls
    assert err.recovery_hint == err.error_class.recovery_hint != "unknown"
    assert err.worker_pid == old and err.phase == "generate"  # type: ignore[attr-defined]
    assert isinstance(err, RuntimeError) and sig in str(err)
    if fault != "sigkill":  # the faulthandler dump from the worker's log
        assert "Fatal Python error" in err.detail and "most recent call first" in err.detail
    assert _gone(old)
    assert crasher.generate("hello", max_tokens=5, temperature=0.0)
    assert crasher.worker_pid not in (None, old)
    assert crasher.crash_count == crashes + 1
    crash = _crumbs("SUBPROC_CRASH")[-1]
    assert crash.meta["signal"] == sig and crash.meta["pid"] == str(old)
    assert CircuitBreaker().status()["recent_crash_count"] == 1


def test_a_stalled_worker_times_out_within_the_timeout(crasher: MLXSubprocessRunner) -> None:
    stream = crasher.stream_generate("keep going", max_tokens=1_000_000, timeout=1.0)
    next(stream)
    pid = crasher.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(SubprocessTimeoutError) as info:
        for _ in stream:
            pass
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 2.5, elapsed
    assert info.value.timeout == 1.0 and info.value.phase == "generate"
    assert _gone(pid)  # killed (SIGKILL works on a stopped process), not left stopped
    assert _crumbs("SUBPROC_TIMEOUT")[-1].meta["pid"] == str(pid)
    assert crasher.generate("hi", max_tokens=3)
    assert crasher.worker_pid != pid


def test_slow_but_progressing_generation_is_never_killed(crasher: MLXSubprocessRunner) -> None:
    pid = crasher.worker_pid
    start = time.monotonic()
    # 0.5 s between tokens against a 1.5 s no-progress timeout: a second of headroom per token
    # for a loaded box, and six tokens take at least twice the timeout in all
    text = crasher.generate("slowly", max_tokens=6, temperature=0.0, timeout=1.5,
                            _debug_token_delay_sec=0.5)
    assert time.monotonic() - start >= 3.0  # twice the 1.5 s timeout, but progressing
    assert text and crasher.worker_pid == pid
    assert crasher.last_result and crasher.last_result["generation_tokens"] == 6
    # the control: the same worker going quiet for longer than the timeout is killed
    with pytest.raises(SubprocessTimeoutError) as info:
        crasher.generate("slowly", max_tokens=3, timeout=1.5, _debug_token_delay_sec=4.0)
    assert _gone(pid)
    # before the kill, faulthandler dumped where the worker was stuck (SIGUSR1)
    assert "most recent call first" in info.value.detail  # type: ignore[attr-defined]
    assert "in _generate" in info.value.detail  # type: ignore[attr-defined]


def test_a_worker_that_died_while_idle_is_replaced_transparently(
        crasher: MLXSubprocessRunner) -> None:
    crasher.generate("hi", max_tokens=2)
    pid = crasher.worker_pid
    assert pid is not None
    crashes = crasher.crash_count
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _exited(pid), interval=0.02, what=f"worker {pid} to die")
    assert crasher.generate("hi", max_tokens=3)  # no exception: the call never saw the death
    assert crasher.worker_pid != pid and crasher.crash_count == crashes + 1
    assert _crumbs("SUBPROC_CRASH")[-1].meta["phase"] == "idle"


@pytest.fixture
def load_crasher(tmp_path: Path) -> Iterator[MLXSubprocessRunner]:
    """A runner whose every worker aborts while loading (before MLX is imported: cheap)."""
    r = MLXSubprocessRunner(tmp_path / "never-loaded", env=FAULTS, start=False,
                            load_kwargs={"_debug_fault": "abort"})
    yield r
    r.shutdown()


def test_a_crash_while_loading_is_a_typed_crash(load_crasher: MLXSubprocessRunner) -> None:
    with pytest.raises(SubprocessCrashError) as info:
        load_crasher.generate("hi")
    assert info.value.signal == "SIGABRT" and info.value.phase == "load"  # type: ignore[attr-defined]
    assert load_crasher.worker_pid is None and load_crasher.crash_count == 1


def test_repeated_crashes_trip_the_breaker_and_refuse_respawn(
        load_crasher: MLXSubprocessRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard.breaker import CircuitBreaker

    for _ in range(2):  # the default threshold: 2 crashes within the window
        with pytest.raises(SubprocessCrashError):
            load_crasher.generate("hi")
    with pytest.raises(MLXCooldownActive) as info:
        load_crasher.generate("hi")
    assert info.value.remaining_sec > 3000 and load_crasher.crash_count == 2
    assert CircuitBreaker().status()["in_cooldown"]
    monkeypatch.setenv("METALGUARD_MODE", "observer")  # observer mode: logged, not refused
    with pytest.raises(SubprocessCrashError):
        load_crasher.generate("hi")
    monkeypatch.delenv("METALGUARD_MODE")
    CircuitBreaker().clear()
    with pytest.raises(SubprocessCrashError):  # cleared: spawning is allowed again
        load_crasher.generate("hi")


def test_respawn_backoff_doubles_until_a_call_succeeds(
        load_crasher: MLXSubprocessRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "1000")
    sleeps: list[float] = []
    monkeypatch.setattr(load_crasher, "_sleep", sleeps.append)
    for _ in range(5):
        with pytest.raises(SubprocessCrashError):
            load_crasher.generate("hi")
    assert len(sleeps) == 4  # none before the first start
    for got, want in zip(sleeps, (0.25, 0.5, 1.0, 2.0), strict=True):
        assert want - 0.2 < got <= want


def test_a_success_resets_the_backoff(crasher: MLXSubprocessRunner,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(crasher, "_sleep", sleeps.append)
    with pytest.raises(SubprocessCrashError):
        inject_worker_fault(crasher, "abort")
    assert crasher.generate("hi", max_tokens=2)
    assert len(sleeps) == 1 and 0.05 < sleeps[0] <= 0.25


def test_respawn_waits_for_memory_to_return_but_not_forever(
        load_crasher: MLXSubprocessRunner, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SubprocessCrashError):
        load_crasher.generate("hi")
    monkeypatch.setattr(load_crasher, "_baseline_available", 1 << 62)  # never reachable
    monkeypatch.setattr(load_crasher, "memory_recovery_timeout_sec", 0.5)
    start = time.monotonic()
    with pytest.raises(SubprocessCrashError):
        load_crasher.generate("hi")
    assert time.monotonic() - start >= 0.5
    assert _crumbs("SUBPROC_MEMORY_WAIT")[-1].meta["outcome"] == "timeout"
    assert "has not returned to its pre-load level" in caplog.text


def test_footprint_over_the_hard_limit_is_stopped_then_killed(
        crasher: MLXSubprocessRunner) -> None:
    from metal_guard.breaker import CircuitBreaker

    crasher.generate("hi", max_tokens=2)
    pid = crasher.worker_pid
    base = crasher.footprint_bytes()
    assert pid is not None and base is not None
    crasher.max_footprint_bytes = base + (96 << 20)
    alloc = dict(chunk_bytes=32 << 20, total_bytes=384 << 20, interval_sec=0.05, hold_sec=20)
    try:
        # 1. a worker that stops when asked keeps running, the caller gets a MemoryError
        with pytest.raises(MetalOOMError, match="exceeded the hard limit"):
            inject_worker_fault(crasher, "alloc", **alloc)
        assert crasher.worker_pid == pid
        # 2. one that ignores the stop and SIGTERM is SIGKILLed (its whole process group)
        with pytest.raises(SubprocessCrashError) as info:
            inject_worker_fault(crasher, "alloc", ignore_stop=True, ignore_sigterm=True, **alloc)
    finally:
        crasher.max_footprint_bytes = None
    err = info.value
    assert err.signal == "SIGKILL" and "exceeded the hard limit" in str(err)
    assert err.error_class is not None and err.error_class.name == "worker_killed"
    actions = [b.meta["action"] for b in _crumbs("SUBPROC_FOOTPRINT")]
    assert actions == ["stop", "stop", "sigterm", "sigkill"]
    assert CircuitBreaker().status()["recent_crash_count"] == 0  # our own kill: not a GPU event
    assert crasher.generate("hi", max_tokens=2)


PARENT = textwrap.dedent("""
    import sys, time
    from metal_guard.isolation import MLXSubprocessRunner
    runner = MLXSubprocessRunner(sys.argv[1], use_lock=False)  # two parents run at once
    print(runner.worker_pid, flush=True)
    if sys.argv[2] == "busy":
        stream = runner.stream_generate("go", max_tokens=10_000_000, temperature=0.0)
        next(stream)
        print("generating", flush=True)  # the worker has produced a token: it is mid-request
        for _ in stream:
            pass
    time.sleep(120)
""")


def test_worker_exits_within_two_seconds_of_its_parent_being_killed(
        tiny_model_path: Path, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parents = {mode: subprocess.Popen([sys.executable, str(script), str(tiny_model_path), mode],
                                      stdout=subprocess.PIPE, text=True)
               for mode in ("idle", "busy")}
    try:
        workers = {}
        for mode, parent in parents.items():
            assert parent.stdout is not None
            workers[mode] = int(parent.stdout.readline())
        busy_out = parents["busy"].stdout
        assert busy_out is not None and busy_out.readline().strip() == "generating"
        assert psutil.Process(workers["busy"]).status() != psutil.STATUS_ZOMBIE
        for parent in parents.values():
            parent.kill()
            parent.wait()
        start = time.monotonic()
        while time.monotonic() - start < 2.0 and not all(_gone(p) for p in workers.values()):
            time.sleep(0.02)
        assert all(_gone(p) for p in workers.values()), "a worker outlived its parent by 2 s"
    finally:
        for parent in parents.values():
            if parent.poll() is None:
                parent.kill()
                parent.wait()


def _fd_targets() -> dict[int, str]:
    """This process's open fds and what each refers to (``/proc/self/fd`` readlinks)."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return targets


@pytest.fixture
def quiet_footprint_sampling(monkeypatch: pytest.MonkeyPatch) -> threading.Lock:
    """A lock that every footprint sample of the runner's monitor thread holds.

    A sample reads the worker's process tree with psutil, which opens ``/proc`` and
    ``/proc/<pid>/stat`` of every process for a moment (``Process.children``). Taken while a
    sample runs, a snapshot of our fds shows one of those: the ±1 the count-based check saw.
    Holding this lock, the snapshot sees the fds that stay.
    """
    from metal_guard.isolation import supervisor

    lock = threading.Lock()
    real = supervisor.FootprintMonitor.sample

    def sample(self: supervisor.FootprintMonitor) -> int | None:
        with lock:
            return real(self)

    monkeypatch.setattr(supervisor.FootprintMonitor, "sample", sample)
    return lock


def _stable_fds(runner: MLXSubprocessRunner, sampling: threading.Lock) -> dict[int, str]:
    """Our fds with no footprint sample in flight, minus the current worker's channel socket
    (replaced by every respawn: the one fd that may differ)."""
    gc.collect()  # an object of an earlier test may still hold an fd: let it go
    with sampling:
        fds = _fd_targets()
    chan = runner._handle.chan
    assert chan is not None
    channel = chan.sock.fileno()
    assert fds.pop(channel).startswith("socket:")
    return fds


def _crash(runner: MLXSubprocessRunner, kind: str) -> None:
    with pytest.raises(SubprocessCrashError):
        if kind == "sigkill":
            _kill_mid_stream(runner)
        else:
            inject_worker_fault(runner, kind)
    assert runner.generate("hi", max_tokens=2, temperature=0.0)


def test_crash_respawn_cycles_leak_no_process_zombie_fd_or_thread(
        crasher: MLXSubprocessRunner, monkeypatch: pytest.MonkeyPatch,
        quiet_footprint_sampling: threading.Lock) -> None:
    from metal_guard.forensics.orphans import scan_orphan_subproc_pre

    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "100000")
    monkeypatch.setattr(crasher, "backoff_base_sec", 0.05)
    crasher.generate("hi", max_tokens=2)  # a live worker spawned under this test's home
    me = psutil.Process()
    fds, threads = _stable_fds(crasher, quiet_footprint_sampling), threading.active_count()
    assert [c.pid for c in me.children(recursive=True)] == [crasher.worker_pid]
    pids = {crasher.worker_pid}
    crashes = crasher.crash_count
    kinds = ("huge_alloc", "abort", "sigkill")  # SIGSEGV, SIGABRT, SIGKILL mid-stream
    for i in range(CYCLES):
        _crash(crasher, kinds[i % len(kinds)])
        pids.add(crasher.worker_pid)
    assert len(pids) == CYCLES + 1 and crasher.crash_count == crashes + CYCLES
    children = me.children(recursive=True)  # exactly the live worker: no leftovers, no zombies
    assert [c.pid for c in children] == [crasher.worker_pid]
    assert children[0].status() != psutil.STATUS_ZOMBIE
    # one footprint monitor, as before: the old workers' monitors end on their own threads
    wait_for(lambda: threading.active_count() == threads,
             what=f"{threading.active_count()} threads to settle back to {threads}")
    assert _stable_fds(crasher, quiet_footprint_sampling) == fds  # the same fds, one by one
    assert scan_orphan_subproc_pre(threshold_sec=0) == []  # every PRE has its POST


def test_crashes_while_loading_leak_no_fd(load_crasher: MLXSubprocessRunner,
                                           monkeypatch: pytest.MonkeyPatch,
                                           quiet_footprint_sampling: threading.Lock) -> None:
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "100000")
    monkeypatch.setattr(load_crasher, "backoff_base_sec", 0.01)

    def fds() -> dict[int, str]:  # the module's other worker may be sampled meanwhile
        gc.collect()
        with quiet_footprint_sampling:
            return _fd_targets()

    before = fds()
    for _ in range(6):
        with pytest.raises(SubprocessCrashError) as info:
            load_crasher.generate("hi")
        assert info.value.phase == "load"  # type: ignore[attr-defined]
    assert fds() == before  # no worker and no channel left: nothing may differ at all
    assert load_crasher.worker_pid is None and load_crasher.crash_count == 6


def test_orphan_scan_finds_and_kills_a_stuck_worker(tiny_model_path: Path) -> None:
    from metal_guard.forensics.orphans import kill_orphans, scan_orphan_subproc_pre

    runner = MLXSubprocessRunner(tiny_model_path, env=FAULTS)
    outcome: list[BaseException] = []

    def stuck() -> None:  # a generation that sits in one step for a long time
        try:
            runner.generate("x", max_tokens=2, timeout=60, _debug_token_delay_sec=30)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=stuck)
    thread.start()
    try:
        pid = runner.worker_pid
        found = wait_for(lambda: scan_orphan_subproc_pre(threshold_sec=0),
                         what="the stuck request's unmatched SUBPROC_PRE")
        assert [(o.pid, o.status) for o in found] == [(pid, "running")]
        assert found[0].create_time == pytest.approx(psutil.Process(pid).create_time(), abs=0.05)
        assert kill_orphans(found, grace_sec=2)[0]["action"] == "terminated"
        thread.join(10)
        assert isinstance(outcome[0], SubprocessCrashError)
        assert outcome[0].signal == "SIGTERM"
        assert scan_orphan_subproc_pre(threshold_sec=0) == []  # the parent closed the PRE
        assert runner.generate("hi", max_tokens=2)  # and a new worker answers
    finally:
        runner.shutdown()
        thread.join(10)
