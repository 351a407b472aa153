"""L8 cross-process lock: real processes, real flock, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from metal_guard import lock as lockmod
from metal_guard import lock_holder
from metal_guard.errors import MLXLockConflict
from metal_guard.lock import (
    acquire_mlx_lock,
    lock_sidecar_path,
    mlx_exclusive_lock,
    read_mlx_lock,
    release_mlx_lock,
)
from metal_guard.settings import get_settings

pytestmark = pytest.mark.usefixtures("drop_lock_holds")

HOLDER = r"""
import signal, sys
from metal_guard.lock import acquire_mlx_lock
if "ignore-term" in sys.argv[1:]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
acquire_mlx_lock("child-holder")
print("READY", flush=True)
sys.stdin.readline()
"""

CONTENDER = r"""
import os, sys, time
from pathlib import Path
from metal_guard.lock import mlx_exclusive_lock
log, n, start = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
pid = os.getpid()
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
print("READY", flush=True)
while not start.exists():
    time.sleep(0.005)
for _ in range(n):
    with mlx_exclusive_lock("stress", timeout=120):
        os.write(fd, b"in %d\n" % pid)
        os.sched_yield()
        os.write(fd, b"out %d\n" % pid)
os.close(fd)
"""

TRY_ONCE = r"""
import json
from metal_guard.errors import MLXLockConflict
from metal_guard.lock import acquire_mlx_lock
try:
    info = acquire_mlx_lock("probe")
    print(json.dumps({"acquired": info["acquired"]}))
except MLXLockConflict as exc:
    print(json.dumps({"acquired": False, "holder": exc.holder.as_dict()}))
"""




class Holder:
    """A child process that holds the lock until told to exit."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "READY":
            self.proc.kill()
            raise AssertionError(f"holder failed: {line!r} {self.proc.stderr.read()}")  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.proc.stdin.write("\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def holder():
    made: list[Holder] = []

    def make(*args: str) -> Holder:
        h = Holder(*args)
        made.append(h)
        return h

    yield make
    for h in made:
        h.finish()


def try_in_child() -> dict:
    out = subprocess.run([sys.executable, "-c", TRY_ONCE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def lock_path() -> Path:
    return get_settings().resolved_lock_path


# --------------------------------------------------------------------------- basics


def test_acquire_writes_sidecar_and_release_removes_it():
    assert read_mlx_lock() is None
    info = acquire_mlx_lock("unit")
    assert info["acquired"] and info["depth"] == 1 and info["pid"] == os.getpid()
    sidecar = json.loads(lock_sidecar_path().read_text())
    assert sidecar["pid"] == os.getpid()
    assert sidecar["create_time"] == pytest.approx(psutil.Process().create_time())
    assert sidecar["label"] == "unit"
    assert sidecar["host"] and sidecar["cmdline"]
    assert datetime.fromisoformat(sidecar["started_at"]).utcoffset().total_seconds() == 0
    assert lock_sidecar_path() == lock_path().with_name("mlx_exclusive.lock.holder.json")
    seen = read_mlx_lock()
    assert seen is not None and seen["held_by_this_process"] and seen["label"] == "unit"
    assert release_mlx_lock() is True
    assert not lock_sidecar_path().exists()
    assert read_mlx_lock() is None
    assert release_mlx_lock() is False


def test_reentrant_with_reference_count():
    acquire_mlx_lock("outer")
    assert acquire_mlx_lock("inner")["depth"] == 2
    assert release_mlx_lock() is True
    assert try_in_child()["acquired"] is False  # still held after one release
    assert release_mlx_lock() is True
    assert try_in_child()["acquired"] is True


def test_reentrancy_is_per_process_across_threads():
    acquire_mlx_lock("main")
    result: dict = {}

    def worker():
        result["info"] = acquire_mlx_lock("thread")
        result["released"] = release_mlx_lock()

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert result["info"]["depth"] == 2 and result["released"] is True
    assert read_mlx_lock()["held_by_this_process"]
    release_mlx_lock()
    assert read_mlx_lock() is None


def test_context_manager_releases_on_error():
    with pytest.raises(KeyError), mlx_exclusive_lock("ctx") as info:
        assert info["acquired"]
        raise KeyError("boom")
    assert read_mlx_lock() is None
    assert try_in_child()["acquired"] is True


def test_bad_arguments():
    with pytest.raises(ValueError):
        acquire_mlx_lock("x", timeout=-1)
    with pytest.raises(TypeError):
        acquire_mlx_lock(123)  # type: ignore[arg-type]
    assert read_mlx_lock() is None


def test_mlx_lock_path_relocates(tmp_path, monkeypatch):
    custom = tmp_path / "elsewhere" / "gpu.lock"
    monkeypatch.setenv("MLX_LOCK_PATH", str(custom))
    with mlx_exclusive_lock("moved") as info:
        assert info["lock_path"] == str(custom)
        assert custom.exists()
        assert (tmp_path / "elsewhere" / "gpu.lock.holder.json").exists()
        assert try_in_child()["acquired"] is False
    assert not (tmp_path / "elsewhere" / "gpu.lock.holder.json").exists()


# --------------------------------------------------------------------------- other processes


def test_conflict_names_the_verified_holder(holder):
    h = holder()
    t0 = time.monotonic()
    with pytest.raises(MLXLockConflict) as err:
        acquire_mlx_lock("me")
    assert time.monotonic() - t0 < 2.0  # a verified holder fails fast
    assert err.value.holder["pid"] == h.pid
    assert err.value.holder["verified"] is True
    assert err.value.holder["label"] == "child-holder"
    seen = read_mlx_lock()
    assert seen["pid"] == h.pid and not seen["held_by_this_process"]


def test_timeout_waits_for_the_holder(holder):
    h = holder()
    threading.Timer(0.5, h.release).start()
    t0 = time.monotonic()
    info = acquire_mlx_lock("patient", timeout=20)
    assert info["acquired"]
    assert 0.3 < time.monotonic() - t0 < 15
    release_mlx_lock()


def test_timeout_expires_with_conflict(holder):
    holder()
    t0 = time.monotonic()
    with pytest.raises(MLXLockConflict):
        acquire_mlx_lock("impatient", timeout=0.4)
    assert 0.35 < time.monotonic() - t0 < 5


def test_sigkilled_holder_frees_the_lock_at_once(holder):
    h = holder()
    assert read_mlx_lock()["pid"] == h.pid
    os.kill(h.pid, signal.SIGKILL)
    h.proc.wait(10)
    assert lock_sidecar_path().exists()  # the dead holder's description stays behind ...
    t0 = time.monotonic()
    info = acquire_mlx_lock("next")
    assert time.monotonic() - t0 < 0.3  # ... but the kernel lock is free immediately
    assert info["acquired"] and json.loads(lock_sidecar_path().read_text())["pid"] == os.getpid()
    release_mlx_lock()


def test_dead_holder_sidecar_is_not_trusted_and_cleaned(holder):
    h = holder()
    os.kill(h.pid, signal.SIGKILL)
    h.proc.wait(10)
    assert read_mlx_lock() is None
    assert not lock_sidecar_path().exists()  # removed while the probe held the lock


def test_read_never_reports_a_holder_for_a_free_lock():
    lock_path().parent.mkdir(parents=True, exist_ok=True)
    lock_path().touch()
    me = psutil.Process()
    lock_sidecar_path().write_text(json.dumps({"pid": os.getpid(), "create_time": me.create_time()}))
    assert read_mlx_lock() is None  # a live, matching pid — but the kernel lock is free


def test_forged_sidecar_on_a_held_lock_is_unverified(holder):
    h = holder()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        ct = psutil.Process(sleeper.pid).create_time()
        lock_sidecar_path().write_text(json.dumps({"pid": sleeper.pid, "create_time": ct + 100, "label": "forged"}))
        seen = read_mlx_lock()
        assert seen["held"] and seen["verified"] is False and seen["pid"] is None
        assert "started at another time" in seen["reason"]
        assert seen["claimed"]["label"] == "forged"
        # Right create_time but not the kernel lock's owner (Linux /proc/locks cross-check).
        lock_sidecar_path().write_text(json.dumps({"pid": sleeper.pid, "create_time": ct}))
        seen = read_mlx_lock()
        if sys.platform.startswith("linux") or lock_holder.flock_owner_pids(lock_path()) is not None:
            assert seen["verified"] is False and "does not own" in seen["reason"]
        assert h.proc.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_corrupt_sidecar_is_quarantined(holder, caplog):
    holder()
    lock_sidecar_path().write_text("{not json")
    seen = read_mlx_lock()
    assert seen["verified"] is False and seen["pid"] is None
    assert list(lock_sidecar_path().parent.glob("*.holder.json.corrupt-*"))
    with pytest.raises(MLXLockConflict):
        acquire_mlx_lock("x")


# --------------------------------------------------------------------------- force


@pytest.fixture
def kill_spy(monkeypatch):
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def spy(pid: int, sig: int) -> None:
        if sig == 0:  # a liveness probe (psutil uses it), not a signal
            return real_kill(pid, sig)
        sent.append((pid, sig))
        if pid <= 1:
            raise AssertionError(f"tried to signal pid {pid}")
        real_kill(pid, sig)

    monkeypatch.setattr(lockmod.os, "kill", spy)
    return sent


def test_force_never_signals_forged_or_pid1_holders(holder, kill_spy, monkeypatch):
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "1")
    monkeypatch.setenv("MLX_RECLAIM_COOLDOWN_SEC", "3")
    h = holder()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        ct = psutil.Process(sleeper.pid).create_time()
        init_ct = psutil.Process(1).create_time()
        forged = [
            {"pid": sleeper.pid, "create_time": ct + 100, "label": "forged-live"},
            {"pid": 1, "create_time": init_ct + 100, "label": "forged-init"},
            {"pid": 1, "create_time": init_ct, "label": "init-exact"},
        ]
        for claim in forged:
            lock_sidecar_path().write_text(json.dumps(claim))
            with pytest.raises(MLXLockConflict) as err:
                acquire_mlx_lock("forcer", force=True)
            assert err.value.holder["pid"] is None
            assert err.value.holder.get("force_refused")
        assert kill_spy == []
        assert sleeper.poll() is None and h.proc.poll() is None and psutil.pid_exists(1)
        # Once the kernel lock is really free, force takes it without signalling or cooling down.
        h.release()
        assert h.proc.wait(10) == 0
        lock_sidecar_path().write_text(json.dumps(forged[1]))
        t0 = time.monotonic()
        info = acquire_mlx_lock("forcer", force=True)
        assert info["acquired"] and "reclaimed_from" not in info
        assert time.monotonic() - t0 < 1.5
        assert kill_spy == [] and sleeper.poll() is None
        release_mlx_lock()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_force_takes_over_from_a_verified_same_user_holder(holder, kill_spy, monkeypatch):
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "10")
    monkeypatch.setenv("MLX_RECLAIM_COOLDOWN_SEC", "0.3")
    h = holder()
    t0 = time.monotonic()
    info = acquire_mlx_lock("taker", force=True)
    elapsed = time.monotonic() - t0
    assert info["acquired"] and info["reclaimed_from"]["pid"] == h.pid
    assert kill_spy == [(h.pid, signal.SIGTERM)]
    assert h.proc.wait(10) == -signal.SIGTERM
    assert elapsed >= 0.3  # the reclaim cool-down ran
    release_mlx_lock()


def test_force_times_out_when_the_holder_ignores_sigterm(holder, kill_spy, monkeypatch):
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "0.6")
    h = holder("ignore-term")
    with pytest.raises(MLXLockConflict) as err:
        acquire_mlx_lock("taker", force=True)
    assert err.value.holder["force_timeout"] is True
    assert err.value.holder["pid"] == h.pid
    assert kill_spy == [(h.pid, signal.SIGTERM)]
    assert h.proc.poll() is None  # still alive and still the holder
    assert read_mlx_lock()["pid"] == h.pid


def test_force_never_signals_another_users_holder(holder, kill_spy, monkeypatch):
    h = holder()
    # The holder is a real, verified process; only our own uid is made to differ from its uid.
    monkeypatch.setattr(lockmod.os, "getuid", lambda: 54321)
    with pytest.raises(MLXLockConflict) as err:
        acquire_mlx_lock("taker", force=True)
    assert "another user" in err.value.holder["force_refused"]
    assert err.value.holder["pid"] == h.pid and "force refused" in str(err.value)
    assert kill_spy == [] and h.proc.poll() is None


def test_force_with_free_lock_just_acquires(kill_spy):
    info = acquire_mlx_lock("free", force=True)
    assert info["acquired"] and kill_spy == []
    release_mlx_lock()


# --------------------------------------------------------------------------- observer mode


def test_observer_mode_logs_instead_of_raising(holder, monkeypatch, caplog):
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    h = holder()
    ran = False
    with caplog.at_level("WARNING", logger="metal_guard.lock"), mlx_exclusive_lock("watcher") as info:
        ran = True
        assert info["acquired"] is False and info["observer"] is True
        assert info["holder"]["pid"] == h.pid
    assert ran
    assert "observer mode" in caplog.text
    crumbs = get_settings().resolved_breadcrumb_path
    assert "LOCK_CONFLICT" in crumbs.read_text()
    assert read_mlx_lock()["pid"] == h.pid  # the holder was not disturbed


# --------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_inherit_the_hold():
    acquire_mlx_lock("parent")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ok = b"0"
            try:
                acquire_mlx_lock("child")
            except MLXLockConflict:
                ok = b"1"
            os.write(w, ok)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    os.close(r)
    release_mlx_lock()
    assert try_in_child()["acquired"] is True


# --------------------------------------------------------------------------- contention


def _contend(tmp_path: Path, procs: int, n: int) -> tuple[list[str], float]:
    log = tmp_path / "inout.log"
    start = tmp_path / "start"
    children = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(log), str(n), str(start)],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(procs)
    ]
    for c in children:  # all imported and at the start line: they contend from the first round
        assert c.stdout is not None and c.stdout.readline().strip() == "READY"
    t0 = time.monotonic()
    start.touch()
    for c in children:
        assert c.wait(600) == 0
    elapsed = time.monotonic() - t0
    return log.read_text().splitlines(), elapsed


def _assert_never_two_holders(lines: list[str], procs: int, n: int) -> None:
    assert len(lines) == 2 * procs * n
    for i in range(0, len(lines), 2):
        a, b = lines[i].split(), lines[i + 1].split()
        assert a[0] == "in" and b[0] == "out" and a[1] == b[1], (i, lines[i - 2 : i + 4])
    assert len({line.split()[1] for line in lines}) == procs


def test_eight_processes_x_500_never_overlap(tmp_path):
    """The issue's acceptance run (about 8 s here). Without the lock the same checker fails."""
    procs, n = 8, 500
    lines, elapsed = _contend(tmp_path, procs, n)
    _assert_never_two_holders(lines, procs, n)
    assert elapsed < 120


# --------------------------------------------------------------------------- doctor / CLI


def test_doctor_section_shows_the_holder(holder, capsys):
    import argparse

    from metal_guard.cli.state import _run_lock, doctor_section

    section = doctor_section()
    assert section["lock"] == "free" and section["lock_holder"] is None
    h = holder()
    section = doctor_section()
    assert section["lock_holder"]["pid"] == h.pid
    assert f"pid {h.pid} (child-holder)" in section["lock"]
    assert _run_lock(argparse.Namespace(json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["held"] is True and out["holder"]["pid"] == h.pid


def test_the_sidecar_path_is_part_of_the_lock_module():
    assert lockmod.lock_sidecar_path is lock_holder.lock_sidecar_path
