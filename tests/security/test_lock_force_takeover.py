"""Item 3: lock force-takeover must never signal a process that does not hold *this* lock.

The attack: the kernel lock is really held (by anybody), the sidecar is forged to name a root
process that holds an ``flock`` on a file with the same inode number on another filesystem.
Matching /proc/locks by inode alone "verified" that process, and ``force=True`` (run as root)
SIGTERMed it. Here the second filesystem is a real tmpfs mounted by the test (root only), the
victim a real root ``sleep`` holding the same-inode lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from metal_guard import lock as lockmod
from metal_guard import lock_holder
from metal_guard.errors import MLXLockConflict
from metal_guard.lock import acquire_mlx_lock, lock_sidecar_path, release_mlx_lock

pytestmark = pytest.mark.usefixtures("drop_lock_holds")

HOLDER = r"""
import sys
from metal_guard.lock import acquire_mlx_lock
acquire_mlx_lock("real-holder")
print("READY", flush=True)
sys.stdin.readline()
"""

# Takes an flock on argv[1], then becomes argv[2:] (same pid, same create_time, lock kept).
LOCK_THEN_EXEC = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.set_inheritable(fd, True)
print("LOCKED", flush=True)
os.execvp(sys.argv[2], sys.argv[2:])
"""

# A process whose command line names metal_guard, holding an flock on argv[1].
LOCK_AND_WAIT = r"""
import fcntl, os, sys  # metal_guard look-alike
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("LOCKED", flush=True)
sys.stdin.readline()
"""




@pytest.fixture
def kill_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def spy(pid: int, sig: int) -> None:
        if sig != 0:  # 0 is a liveness probe
            sent.append((pid, sig))
        real_kill(pid, sig)

    monkeypatch.setattr(lockmod.os, "kill", spy)
    return sent


def _mount_tmpfs(where: Path) -> None:
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")


@pytest.fixture
def two_filesystems(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two fresh tmpfs mounts (root only): the lock's and the victim's."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a second filesystem")
    a, b = tmp_path / "lockfs", tmp_path / "otherfs"
    _mount_tmpfs(a)
    try:
        _mount_tmpfs(b)
    except BaseException:
        subprocess.run(["umount", "-l", str(a)], check=False)
        raise
    try:
        yield a, b
    finally:
        for m in (b, a):
            subprocess.run(["umount", "-l", str(m)], check=False)


def _same_inode_file(directory: Path, inode: int) -> Path:
    """A file in ``directory`` whose inode number is ``inode`` (fresh tmpfs count up)."""
    for i in range(2000):
        candidate = directory / f"victim-{i}.lock"
        candidate.touch()
        if candidate.stat().st_ino == inode:
            return candidate
        if candidate.stat().st_ino > inode:
            break
    pytest.skip("could not make a file with the same inode number on the second filesystem")


def _start(argv: list[str], expect: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != expect:
        proc.kill()
        raise AssertionError(f"{argv[:3]} failed: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@contextlib.contextmanager
def _scene(two_filesystems: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
           victim_argv: list[str]) -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str]]]:
    """A real holder of the lock on filesystem A, a victim locking a same-inode file on B,
    and the sidecar forged to name the victim."""
    lockfs, otherfs = two_filesystems
    lock_path = lockfs / "mlx_exclusive.lock"
    monkeypatch.setenv("MLX_LOCK_PATH", str(lock_path))
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "1")
    monkeypatch.setenv("MLX_RECLAIM_COOLDOWN_SEC", "0")
    holder = _start([sys.executable, "-c", HOLDER], "READY")
    victim = None
    try:
        lock_st = lock_path.stat()
        victim_file = _same_inode_file(otherfs, lock_st.st_ino)
        assert victim_file.stat().st_dev != lock_st.st_dev
        victim = _start([a.replace("{file}", str(victim_file)) for a in victim_argv], "LOCKED")
        ct = psutil.Process(victim.pid).create_time()
        # The kernel's view: the victim owns an flock on an inode numbered like our lock.
        inode_only = {
            int(parts[4]) for line in Path("/proc/locks").read_text().split("\n")
            if len(parts := line.split()) > 5 and parts[1] == "FLOCK"
            and parts[5].rsplit(":", 1)[1] == str(lock_st.st_ino)
        }
        assert victim.pid in inode_only and holder.pid in inode_only
        lock_sidecar_path(lock_path).write_text(json.dumps(
            {"pid": victim.pid, "create_time": ct, "label": "forged"}))
        yield holder, victim
    finally:
        if victim is not None:
            _stop(victim)
        _stop(holder)


@pytest.mark.parametrize("victim", ["root-sleep", "lookalike"])
def test_force_never_signals_a_same_inode_lock_holder_on_another_filesystem(
    two_filesystems: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    kill_spy: list[tuple[int, int]], victim: str,
) -> None:
    argv = {
        # a plain root process: neither our lock nor metal-guard in its command line
        "root-sleep": [sys.executable, "-c", LOCK_THEN_EXEC, "{file}", "sleep", "300"],
        # its command line names metal_guard: only the device check stands in the way
        "lookalike": [sys.executable, "-c", LOCK_AND_WAIT, "{file}"],
    }[victim]
    with _scene(two_filesystems, monkeypatch, argv) as (holder, victim_proc):
        if victim == "root-sleep":
            assert psutil.Process(victim_proc.pid).cmdline() == ["sleep", "300"]
        lock_path = two_filesystems[0] / "mlx_exclusive.lock"
        with pytest.raises(MLXLockConflict) as err:
            acquire_mlx_lock("attacker", force=True)
        assert kill_spy == []
        assert err.value.holder.get("force_refused")
        ok, reason, _ = lock_holder.verify_holder(
            lock_holder.read_sidecar(lock_path), lock_path)
        assert not ok and "does not own the kernel lock" in reason
        assert victim_proc.poll() is None and holder.poll() is None
        # the victim is still alive a moment later (no signal in flight)
        with pytest.raises(subprocess.TimeoutExpired):
            victim_proc.wait(0.3)


def test_device_and_inode_both_must_match_in_proc_locks(tmp_path: Path) -> None:
    path = tmp_path / "l.lock"
    path.touch()
    st = path.stat()
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    ours = f"1: FLOCK  ADVISORY  WRITE 4242 {major:02x}:{minor:02x}:{st.st_ino} 0 EOF"
    other = f"2: FLOCK  ADVISORY  WRITE 777 {major + 1:02x}:{minor:02x}:{st.st_ino} 0 EOF"
    waiter = f"3: -> FLOCK  ADVISORY  WRITE 888 {major:02x}:{minor:02x}:{st.st_ino} 0 EOF"
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/locks is Linux-only")
    assert lock_holder.flock_owner_pids(path, locks_text="\n".join([ours, other, waiter])) == {4242}
    assert lock_holder.flock_owner_pids(path, locks_text=other) is None


def test_force_refuses_a_same_user_process_that_does_not_use_metal_guard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """may_signal needs visible metal-guard use: command line, or our lock file open."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        proc = psutil.Process(sleeper.pid)
        lock = Path(os.environ["METALGUARD_HOME"]) / "x.lock"
        lock.touch()
        ok, why = lock_holder.may_signal(proc, lock)
        assert not ok and "no sign of using metal-guard" in why
    finally:
        sleeper.kill()
        sleeper.wait()


def test_force_still_takes_over_from_a_real_holder_whose_command_line_is_plain(
    monkeypatch: pytest.MonkeyPatch, kill_spy: list[tuple[int, int]], tmp_path: Path,
) -> None:
    """A genuine holder started as ``python script.py`` (no marker on its command line) is
    recognised by the lock file it has open, so force keeps working for ordinary apps."""
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "10")
    monkeypatch.setenv("MLX_RECLAIM_COOLDOWN_SEC", "0")
    script = tmp_path / "app.py"
    script.write_text(HOLDER)
    holder = _start([sys.executable, str(script)], "READY")
    try:
        assert not any(m in " ".join(psutil.Process(holder.pid).cmdline())
                       for m in lock_holder.METAL_GUARD_MARKERS)
        info = acquire_mlx_lock("taker", force=True)
        assert info["acquired"] and info["reclaimed_from"]["pid"] == holder.pid
        assert kill_spy == [(holder.pid, signal.SIGTERM)]
        release_mlx_lock()
    finally:
        _stop(holder)
