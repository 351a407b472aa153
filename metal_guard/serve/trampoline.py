"""The child's first step: tie its life to the front's, then ``exec`` the real server.

``python -m metal_guard.serve.trampoline --ppid P --fd N [--watch pdeathsig|pipe] -- PROG ARGS``

* ``pdeathsig`` (Linux, the default there): ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; the kernel
  kills the server when the front's supervising thread goes away, however it dies. The
  setting survives ``exec``.
* ``pipe`` (elsewhere, e.g. macOS): a forked watchdog process blocks on the read end of a pipe
  whose only write end the front holds. End of file means the front is gone: the watchdog
  sends SIGTERM, then SIGKILL, to the server's process group. It exits by itself when the
  server dies first (it is re-parented).

Either way, if the front is already gone when we get here (``getppid() != P``), the server is
not started. Only the stdlib is imported: this runs before every server start.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

__all__ = ["main"]

PR_SET_PDEATHSIG = 1
#: How long the watchdog waits between SIGTERM and SIGKILL.
TERM_GRACE_SEC = 3.0


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when our parent (thread) dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watchdog(fd: int, server_pid: int) -> None:  # pragma: no cover - runs in a forked child
    """Block until the front's end of the pipe closes, then stop the server's group."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group SIGTERM is for the server
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            if os.getppid() != server_pid:
                return  # the server is gone already
            readable, _, _ = select.select([fd], [], [], 0.5)
            if readable:
                try:
                    data = os.read(fd, 64)
                except OSError:
                    data = b""
                if data:
                    continue
                break  # EOF: the front is gone
        with contextlib.suppress(OSError):
            os.killpg(os.getpgrp(), signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_SEC
        while time.monotonic() < deadline and os.getppid() == server_pid:
            time.sleep(0.05)
        if os.getppid() == server_pid:
            with contextlib.suppress(OSError):
                os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(0)


def _start_pipe_watchdog(fd: int) -> None:
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the watchdog
        for other in range(3, 256):
            if other != fd:
                with contextlib.suppress(OSError):
                    os.close(other)
        _watchdog(fd, server_pid)
    os.close(fd)


def _parse(argv: list[str]) -> tuple[int, int, str, list[str]]:
    ppid, fd, watch = -1, -1, "auto"
    i = 0
    while i < len(argv) and argv[i] != "--":
        key = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if key == "--ppid":
            ppid = int(value)
        elif key == "--fd":
            fd = int(value)
        elif key == "--watch":
            watch = value
        else:
            raise SystemExit(f"metal-guard serve trampoline: unknown option {key!r}")
        i += 2
    command = argv[i + 1:]
    if not command or ppid <= 0 or watch not in ("auto", "pdeathsig", "pipe"):
        raise SystemExit("usage: trampoline --ppid P --fd N [--watch auto|pdeathsig|pipe] -- PROG ...")
    return ppid, fd, watch, command


def main(argv: list[str] | None = None) -> None:
    ppid, fd, watch, command = _parse(list(sys.argv[1:] if argv is None else argv))
    tied = False
    if watch in ("auto", "pdeathsig"):
        tied = set_pdeathsig()
        if not tied and watch == "pdeathsig":
            raise SystemExit("metal-guard serve trampoline: PR_SET_PDEATHSIG is not available")
    if os.getppid() != ppid:
        raise SystemExit("metal-guard serve trampoline: the front is gone; not starting")
    if fd >= 0:
        if not tied:
            _start_pipe_watchdog(fd)
        else:
            with contextlib.suppress(OSError):
                os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(command[0], command)
    except OSError as exc:
        raise SystemExit(f"metal-guard serve: cannot execute {command[0]}: {exc}") from None


if __name__ == "__main__":
    main()
