"""Starting, stopping and interpreting worker processes (used by the runner).

* :func:`start_worker` — a fresh interpreter (``fork`` + ``exec``, never a bare fork), its own
  process group, an inherited socket for the protocol, stdout/stderr (and so the
  ``faulthandler`` dump) appended to a per-worker log ``<cache>/workers/<model>-<ppid>-<id>.log``.
* :class:`WorkerHandle` — the mutable "current worker" of a runner: process, channel, log,
  footprint monitor; stopping and reaping it.
* :func:`crash_detail` / :func:`map_worker_error` — what a caller learns about a dead worker
  or an exception inside it.

Logs of workers that exit cleanly are deleted; crash logs are kept (the newest
:data:`KEEP_CRASH_LOGS`) for forensics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metal_guard.errors import MetalOOMError, WorkerError
from metal_guard.isolation import protocol as P
from metal_guard.isolation.supervisor import signal_group

if TYPE_CHECKING:  # pragma: no cover
    from metal_guard.isolation.lifecycle import WorkerLifecycle
    from metal_guard.isolation.supervisor import FootprintMonitor

log = logging.getLogger("metal_guard.isolation.spawn")

__all__ = [
    "WorkerHandle",
    "crash_detail",
    "map_worker_error",
    "process_alive",
    "read_log_tail",
    "start_worker",
    "worker_log_dir",
]

LOG_TAIL_BYTES = 16 * 1024
#: Default bound on a parent's control-frame send (stop, stats, shutdown); a request's own
#: send is bounded by its timeout.
PARENT_SEND_TIMEOUT_SEC = 5.0
KEEP_CRASH_LOGS = 20
#: Crash logs younger than this are never pruned (a live worker's log may look like one).
PRUNE_MIN_AGE_SEC = 3600.0
_LIVE_LOGS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def worker_log_dir() -> Path:
    from metal_guard.settings import get_settings

    return get_settings().cache_dir / "workers"


def _slug(model_id: str) -> str:
    base = Path(model_id.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:60]


def _prune_logs(directory: Path) -> None:
    try:
        logs = sorted(directory.glob("*.log"), key=lambda p: p.lstat().st_mtime, reverse=True)
    except OSError:
        return
    now = time.time()
    with _LIVE_LOCK:
        live = set(_LIVE_LOGS)
    for path in logs[KEEP_CRASH_LOGS:]:
        with contextlib.suppress(OSError):
            if str(path) not in live and now - path.lstat().st_mtime > PRUNE_MIN_AGE_SEC:
                path.unlink()


def _child_env(runner: WorkerLifecycle) -> dict[str, str]:
    env = dict(os.environ)
    env.update(runner.env)
    env["METALGUARD_SUBPROCESS_WORKER"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # The parent guards the worker; the zero-code boot module must not install adapters in
    # it too (their cadence/lock checks would refuse the worker's own respawn loads).
    env["METALGUARD_AUTOLOAD"] = "0"
    # Like multiprocessing's spawn: the child sees the parent's import path.
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def process_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` is still running, *without* reaping it.

    ``Popen.poll()`` is not safe here: called from two threads at once, one of them gets
    ``None`` for a process that is already dead. ``waitid(WNOWAIT)`` only peeks.
    """
    if proc.returncode is not None:
        return False
    if not hasattr(os, "waitid"):  # pragma: no cover - Pythons without waitid()
        import psutil

        try:
            return bool(psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already (by Popen.wait in another thread)
        return False
    return info is None


class WorkerHandle:
    """The runner's current worker. Fields are replaced as workers come and go."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: P.Channel | None = None
        self.ready: dict[str, Any] | None = None
        self.log_path: Path | None = None
        self.monitor: FootprintMonitor | None = None
        self.kill_reason: str | None = None
        self.in_generation = False
        self.current_id: int | None = None  # the request in progress, if any

    def discard(self, *, keep_log: bool) -> None:
        """Forget the current worker: stop its monitor, close the channel, maybe drop the log."""
        monitor, chan, path = self.monitor, self.chan, self.log_path
        self.proc = self.chan = self.monitor = None
        self.ready = None
        self.log_path = None
        if monitor is not None:
            monitor.stop()
        if chan is not None:
            chan.close()
        if path is not None:
            with _LIVE_LOCK:
                _LIVE_LOGS.discard(str(path))
            if not keep_log:
                with contextlib.suppress(OSError):
                    path.unlink()

    @staticmethod
    def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
        """Reap ``proc`` (SIGKILL its group if it lingers); its return code."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            try:
                return proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                return proc.poll()

    @staticmethod
    def stop_process(proc: subprocess.Popen[bytes], *, grace_sec: float,
                     chan: P.Channel | None = None) -> int | None:
        """Stop a worker: (``shutdown`` frame and) ``grace_sec`` to exit, SIGTERM, SIGKILL."""
        if not process_alive(proc):
            return WorkerHandle.wait_exit(proc)
        if chan is not None:
            with contextlib.suppress(OSError, ValueError):
                chan.send(P.frame(P.SHUTDOWN), timeout=min(max(grace_sec, 0.1), 2.0))
        if grace_sec > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout=grace_sec)
            signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout=min(2.0, grace_sec))
        signal_group(proc.pid, signal.SIGKILL)
        return WorkerHandle.wait_exit(proc)

    @staticmethod
    def reap(handle: WorkerHandle) -> None:
        """Finalizer of a runner that was never shut down: kill its worker."""
        proc = handle.proc
        if proc is not None and process_alive(proc):
            signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5.0)
        with contextlib.suppress(Exception):
            handle.discard(keep_log=proc is not None and proc.returncode not in (0, None))


#: A new worker log: created here or not at all (a name planted in the log directory, a
#: symlink included, is never opened); storage adds no-follow and close-on-exec.
_NEW_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND


def open_new_log(path: Path, mode: int) -> int:
    """Create the worker log ``path`` (mode ``mode``, 0600) and return a write descriptor.

    ``FileExistsError`` when anything (a file, a symlink) is already at ``path``: the name is
    random, so that is someone else's doing, and it is never followed or appended to.
    """
    from metal_guard.storage import open_nofollow

    fd = open_nofollow(path, _NEW_LOG_FLAGS, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits; never more than ``mode``
    except BaseException:
        os.close(fd)
        raise
    return fd


def start_worker(runner: WorkerLifecycle, handle: WorkerHandle) -> None:
    """Start a worker for ``runner`` and store it in ``handle`` (no waiting for ``ready``)."""
    from multiprocessing.spawn import get_executable

    from metal_guard.isolation.worker import WorkerConfig
    from metal_guard.storage import FILE_MODE, ensure_dir

    directory = ensure_dir(worker_log_dir())
    _prune_logs(directory)
    log_path = directory / f"{_slug(runner.model_id)}-{os.getpid()}-{uuid.uuid4().hex[:10]}.log"
    config = WorkerConfig(model_id=runner.model_id, backend=runner.backend,
                          parent_pid=os.getpid(),
                          heartbeat_interval_sec=runner.heartbeat_interval_sec,
                          load_kwargs=runner.load_kwargs, env=runner.env)
    parent_sock, child_sock = socket.socketpair()
    log_fd = open_new_log(log_path, FILE_MODE)
    try:
        argv = [os.fsdecode(get_executable()), "-m", "metal_guard.isolation.worker",
                "--fd", str(child_sock.fileno()), "--config", config.to_json()]
        proc = subprocess.Popen(argv, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=log_fd, stderr=log_fd, env=_child_env(runner),
                                close_fds=True, process_group=0)
    except BaseException:
        parent_sock.close()
        with contextlib.suppress(OSError):
            log_path.unlink()
        raise
    finally:
        os.close(log_fd)
        child_sock.close()
    with _LIVE_LOCK:
        _LIVE_LOGS.add(str(log_path))
    handle.proc = proc
    handle.chan = P.Channel(parent_sock, P.WORKER_FRAMES, send_timeout=PARENT_SEND_TIMEOUT_SEC)
    handle.log_path = log_path
    handle.ready = None
    handle.kill_reason = None
    handle.in_generation = False


def read_log_tail(path: Path | None, max_bytes: int = LOG_TAIL_BYTES) -> str:
    if path is None:
        return ""
    from metal_guard.storage import NotAStateFile, read_bytes_capped

    try:  # no-follow: a log swapped for a symlink is not read into an error message
        found = read_bytes_capped(path, max_bytes, tail=True)
    except (NotAStateFile, OSError) as exc:  # StateFileError is an OSError
        log.debug("cannot read worker log %s: %s", path, exc)
        return ""
    return "" if found is None else found[0].decode("utf-8", "replace")


def crash_detail(handle: WorkerHandle) -> str:
    """The worker's last words: its log tail, then the most telling line, then why we killed
    it (if we did) — the last line is what :class:`SubprocessCrashError`'s message shows."""
    from metal_guard.classify import classify_mlx_error

    tail = read_log_tail(handle.log_path).strip()
    parts = [tail] if tail else []
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line.startswith("Fatal Python error") or (line and classify_mlx_error(line)):
            parts.append(line)  # the headline goes last: it ends the error message
            break
    if handle.kill_reason:
        parts.append(handle.kill_reason)
    return "\n".join(parts)


def map_worker_error(model_id: str, fr: dict[str, Any], *, stop_reason: str | None,
                     pid: int | None) -> BaseException:
    """An ``error`` frame as the matching metal-guard exception, with the worker traceback."""
    from metal_guard.classify import classify_mlx_error

    exc_type = str(fr.get("exc_type") or "Exception")
    message = str(fr.get("message") or "")
    tb = str(fr.get("traceback") or "")
    err: Any
    if exc_type == "GenerationStopped" and stop_reason:
        err = MetalOOMError(f"generation in the worker for {model_id!r} was stopped: {stop_reason}")
    else:
        cls = classify_mlx_error(f"{message}\n{tb}")
        text = f"{exc_type} in the worker for {model_id!r}: {message}"
        if (cls is not None and cls.kind == "oom") or exc_type == "MetalOOMError":
            err = MetalOOMError(text, error_class=cls)
        else:
            err = WorkerError(text, exc_type=exc_type, worker_traceback=tb)
            err.error_class = cls
    err.worker_traceback = tb
    err.phase = fr.get("phase")
    if tb:
        err.add_note(f"worker traceback (pid {pid}):\n{tb.rstrip()}")
    return err
