"""50 crash cycles of a real ``mlx_lm.server`` child leave the front with no leaked process,
file descriptor, thread or port (slow: one model load per cycle).

``METALGUARD_TEST_SERVE_CYCLES`` changes the number of cycles (default 50).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from serve_helpers import READY_TIMEOUT_SEC, Front, pid_gone, serve_env
from support import wait_for

pytest.importorskip("mlx_lm.server")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CYCLES = int(os.environ.get("METALGUARD_TEST_SERVE_CYCLES", "50"))
SIGNALS = (signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV)


def _facts(pid: int) -> tuple[int, int, list[int], set[int]]:
    proc = psutil.Process(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd")) if os.path.isdir(f"/proc/{pid}/fd") else proc.num_fds()
    children = [c.pid for c in proc.children(recursive=True)]
    listening = {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == "LISTEN"}
    return fds, proc.num_threads(), children, listening


def _settle(front: Front, expect_children: int = 1) -> tuple[int, int, list[int], set[int]]:
    """The front's facts once it runs ``expect_children`` children and listens on its port; the
    thread count leaves out the connection threads kept idle for reuse (bounded; they end
    after 30 s idle)."""
    def settled() -> tuple[int, int, list[int], set[int]] | None:
        idle = int(front.status()["front"]["idle_connection_threads"])
        fds, threads, children, listening = _facts(front.proc.pid)
        if len(children) == expect_children and listening == {front.port}:
            return fds, threads - idle, children, listening
        return None

    return wait_for(settled, what=f"the front to run {expect_children} child(ren)")  # type: ignore[no-any-return]


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_crash_cycles_leak_nothing(tmp_path: Path, tiny_model_path: Path) -> None:
    # Crashes in a row double the backoff up to --backoff-max (30 s by default): cap it so the
    # cycles measure the respawn, not the deliberate wait.
    srv = Front(tiny_model_path, tmp_path / "front.log", serve_env(tmp_path / "home"),
                "--backoff-max", "0.1")
    try:
        pid = srv.child_pid()
        fds0, threads0, children0, listen0 = _settle(srv)
        assert children0 == [pid] and listen0 == {srv.port}
        killed: list[tuple[int, int]] = []
        started = time.monotonic()
        for i in range(CYCLES):
            status = srv.status()["serve"]["active"]
            pid, port = int(status["pid"]), int(status["port"])
            os.kill(pid, SIGNALS[i % len(SIGNALS)])
            killed.append((pid, port))
            assert pid_gone(pid)
            wait_for(lambda: srv.wait_ready()["child_pid"] != pid,  # noqa: B023 (called at once)
                     timeout=READY_TIMEOUT_SEC, what=f"a child to replace pid {pid}")
        elapsed = time.monotonic() - started
        print(f"\n{CYCLES} crash cycles in {elapsed:.1f}s ({elapsed / max(1, CYCLES):.2f}s each)")
        status = srv.status()["serve"]
        assert status["crashes"] == CYCLES and status["restarts"] == CYCLES
        # A request thread of the last call may still be closing its connection: wait for the
        # front to be back at (or under) its baseline; a leak never gets there.
        def back_at_baseline() -> tuple[int, int, list[int], set[int]] | None:
            facts = _settle(srv)
            return facts if facts[0] <= fds0 and facts[1] <= threads0 else None

        _fds1, _threads1, children1, listen1 = wait_for(
            back_at_baseline, what=f"the front's fds/threads back at {fds0}/{threads0}")
        assert len(children1) == 1 and children1[0] == status["active"]["pid"]
        assert listen1 == {srv.port}
        for old_pid, old_port in killed:
            assert not psutil.pid_exists(old_pid) or pid_gone(old_pid, timeout=0.1)
            assert _refused(old_port) or old_port == status["active"]["port"]
        logs = list((tmp_path / "home" / "state" / "serve").glob("*.log*"))
        assert 1 <= len(logs) <= 2  # one log per front (plus one rotation), not one per child
    finally:
        assert srv.stop() == 0
