"""Light helpers shared by the tests (no MLX, no server; safe to import from any test module).

* :func:`wait_for` — poll a real condition with a generous deadline, never sleep-and-hope;
  :func:`pid_gone` on top of it.
* :func:`sleeping_child` / :func:`argv_visible` — a plain child process that sleeps (a
  bystander, a victim, a worker look-alike) and the wait until its command line is readable.
* :func:`at` / :func:`write_crumbs` — hand-written breadcrumb lines in the isolated home.
* :class:`HttpClient` — JSON requests against ``self.base`` (the in-process server and the
  server processes share it).
* :func:`free_port` — a TCP port on 127.0.0.1 that nothing listens on right now.

``tests/server_support.py`` (an in-process ``mlx_lm.server``) and ``tests/serve_helpers.py``
(server processes) build on these.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The deadline of a wait on something that does happen, only late on a loaded box.
GENEROUS_SEC = 60.0


def wait_for(predicate: Callable[[], Any], timeout: float = GENEROUS_SEC, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy and return that value; fail with
    an ``AssertionError`` naming ``what`` after ``timeout`` seconds (generous: a deadline here
    only turns a hang into a failure, it is never the thing tested)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int, timeout: float = GENEROUS_SEC) -> bool:
    """True once ``pid`` no longer exists or is a zombie; False if it still runs after
    ``timeout`` seconds."""
    import psutil

    def gone() -> bool:
        try:
            return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    try:
        return bool(wait_for(gone, timeout=timeout, what=f"pid {pid} to exit"))
    except AssertionError:
        return False


# ----------------------------------------------------------------------------- child processes


@contextmanager
def sleeping_child(seconds: int = 300, extra_argv: Sequence[str] = ()) -> Iterator[
        subprocess.Popen[bytes]]:
    """A child ``python -c 'time.sleep(seconds)' *extra_argv``, killed and reaped on exit.

    ``extra_argv`` lands in its command line only (e.g. a worker's ``-m ... --config ...``
    for a look-alike); wait for it with :func:`argv_visible` before judging the process by it.
    """
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})",
                             *extra_argv])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=GENEROUS_SEC)


def argv_visible(proc: subprocess.Popen[bytes], marker: str = "--config") -> subprocess.Popen[bytes]:
    """Wait until ``marker`` shows in ``proc``'s command line (right after ``fork`` + ``exec``
    the parent can run before ``/proc/<pid>/cmdline`` shows the new program's argv)."""
    import psutil

    wait_for(lambda: marker in psutil.Process(proc.pid).cmdline(), interval=0.01,
             what=f"{marker!r} in the command line of pid {proc.pid}")
    return proc


# ----------------------------------------------------------------------------- breadcrumbs


def at(ts: float) -> datetime:
    """A breadcrumb timestamp for the epoch second ``ts``."""
    return datetime.fromtimestamp(ts, UTC)


def write_crumbs(lines: list[str], *, append: bool = True) -> Path:
    """Write raw breadcrumb lines to the isolated home's breadcrumb file (appended, or
    replacing what is there); the file's path."""
    from metal_guard.settings import get_settings

    path = get_settings().resolved_breadcrumb_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HttpClient:
    """JSON over HTTP against ``self.base`` (``http://127.0.0.1:<port>``); an error status is
    returned, not raised."""

    base: str

    def request(self, path: str, body: dict[str, Any] | None = None,
                timeout: float = GENEROUS_SEC) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        return self.request(path, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, _headers, raw = self.request(path, body)
        return status, json.loads(raw)
