"""L11: orphaned ``SUBPROC_PRE`` markers — a worker that started a GPU call and never returned.

A ``SUBPROC_PRE`` breadcrumb without a matching ``SUBPROC_POST`` after the threshold (90 s by
default, ``METALGUARD_SUBPROC_ORPHAN_THRESHOLD_SEC``) strongly suggests Metal is stuck; killing
the worker before the kernel gives up can save a reboot. Pairing is per model: a POST carrying
a ``pid`` closes the PRE of that pid, otherwise the oldest open PRE of the model (FIFO). The
worker's ready line (``SUBPROCESS_WORKER: <model> ready | create_time=... pid=...``) supplies
the process identity used by :func:`kill_orphans`, which signals a pid **only** when its
current ``create_time`` matches the recorded one (so a reused pid is never hit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("metal_guard.forensics.orphans")

__all__ = ["OrphanPre", "kill_orphans", "scan_orphan_subproc_pre", "worker_identity_problem"]

#: Breadcrumb lines examined (the tail of the log).
TAIL_LINES = 2000
#: create_time values recorded by the worker and read back by psutil agree to this many seconds.
CREATE_TIME_TOLERANCE_SEC = 0.05
_LEGACY_READY_RE = re.compile(r"^(?P<model>.+?) ready(?:,\s*pid=(?P<pid>\d+))?$", re.DOTALL)
#: The module every isolation worker runs (``python -m <module>``).
WORKER_MODULE = "metal_guard.isolation.worker"

RUNNING, GONE, UNKNOWN = "running", "gone", "unknown"


@dataclass(frozen=True)
class OrphanPre:
    """An open ``SUBPROC_PRE``. ``status``: ``running`` (the recorded process is alive),
    ``gone`` (exited, rebooted since, or pid reused) or ``unknown`` (no pid recorded)."""

    model_id: str
    pre_ts: float
    age_sec: float
    pid: int | None = None
    create_time: float | None = None
    status: str = UNKNOWN

    @property
    def pre_at(self) -> datetime:
        return datetime.fromtimestamp(self.pre_ts, UTC)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pre_at"] = self.pre_at.isoformat()
        return data


def _int(value: str | None) -> int | None:
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 9:
        return None
    return int(value)


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number == number and number > 0 else None


def _process_status(pid: int | None, create_time: float | None, pre_ts: float) -> str:
    if pid is None:
        return UNKNOWN
    try:
        import psutil

        if pre_ts < psutil.boot_time():
            return GONE  # written before the last boot
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_SEC:
            return GONE
        return GONE if proc.status() == psutil.STATUS_ZOMBIE else RUNNING
    except Exception:  # NoSuchProcess, AccessDenied, psutil missing
        return GONE


def pair_breadcrumbs(lines: list[str]) -> list[tuple[str, float, int | None, float | None]]:
    """Open PREs ``(model, ts, pid, create_time)`` left after pairing ``lines`` (oldest first).

    Never raises: unparseable lines are ignored.
    """
    from metal_guard.breadcrumbs import parse_line

    open_pre: dict[str, deque[tuple[float, int | None]]] = {}
    identity: dict[int, float | None] = {}  # pid -> create_time from ready lines
    ready_pid: dict[str, int] = {}  # model -> pid of its latest ready worker
    for raw in lines:
        try:
            crumb = parse_line(raw)
            if crumb is None:
                continue
            ts = crumb.ts.timestamp()
        except (ValueError, OverflowError, OSError):  # absurd dates in a damaged log
            continue
        if crumb.tag == "SUBPROCESS_WORKER":
            match = _LEGACY_READY_RE.match(crumb.payload)
            if match:
                pid = _int(crumb.meta.get("pid")) or _int(match.group("pid"))
                if pid is not None:
                    identity[pid] = _float(crumb.meta.get("create_time"))
                    ready_pid[_model_key(match.group("model"))] = pid
            continue
        if crumb.tag not in ("SUBPROC_PRE", "SUBPROC_POST"):
            continue
        model = _model_key(crumb.payload)
        pid = _int(crumb.meta.get("pid"))
        if pid is None and crumb.tag == "SUBPROC_PRE":
            pid = ready_pid.get(model)  # the seed's PRE names no pid: its model's worker
        queue = open_pre.setdefault(model, deque())
        if crumb.tag == "SUBPROC_PRE":
            queue.append((ts, pid))
            if pid is not None and crumb.meta.get("create_time"):
                identity[pid] = _float(crumb.meta.get("create_time"))
            continue
        if not queue:
            continue
        if pid is not None:
            for i, (_t, p) in enumerate(queue):
                if p == pid:
                    del queue[i]
                    break
            else:
                queue.popleft()
        else:
            queue.popleft()
    out = [(model, ts, pid, identity.get(pid) if pid is not None else None)
           for model, queue in open_pre.items() for ts, pid in queue]
    out.sort(key=lambda item: item[1])
    return out


def _model_key(name: str) -> str:
    """One spelling of a model in ready, PRE and POST lines (blank names pair as ``"?"``)."""
    return name.strip() or "?"


def scan_orphan_subproc_pre(
    *, threshold_sec: float | None = None, now: datetime | float | None = None,
    breadcrumb_path: Path | str | None = None, settings: Any = None, lines: int = TAIL_LINES,
) -> list[OrphanPre]:
    """Open PREs older than the threshold, oldest first. Empty when the kill switch
    ``METALGUARD_SUBPROC_ORPHAN_WATCH_DISABLED=1`` is set. Reports only; see :func:`kill_orphans`."""
    from metal_guard.breadcrumbs import read_lines

    if settings is None:
        from metal_guard.settings import get_settings

        settings = get_settings()
    if settings.subproc_orphan_watch_disabled:
        return []
    threshold = float(settings.subproc_orphan_threshold_sec if threshold_sec is None else threshold_sec)
    if threshold < 0:
        raise ValueError("threshold_sec must be >= 0")
    now_ts = time.time() if now is None else (now.timestamp() if isinstance(now, datetime) else float(now))
    path = Path(breadcrumb_path) if breadcrumb_path is not None else settings.resolved_breadcrumb_path
    tail = read_lines(lines, path=path)
    orphans: list[OrphanPre] = []
    for model, ts, pid, create_time in pair_breadcrumbs(tail):
        age = now_ts - ts
        if age < threshold:
            continue
        orphans.append(OrphanPre(model, ts, round(age, 3), pid, create_time,
                                 _process_status(pid, create_time, ts)))
    return orphans


def worker_identity_problem(proc: Any, model_id: str, create_time: float | None) -> str | None:
    """Why ``proc`` is *not* verifiably the metal-guard worker of ``model_id`` started at
    ``create_time`` (``None`` when it is): same create_time, same user as us, and the command
    line of an isolation worker whose config names that model."""
    if create_time is None:
        return "no recorded create_time to verify"
    if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_SEC:
        return "pid now belongs to another process"
    if proc.uids().real != os.getuid():
        return f"process runs as uid {proc.uids().real}, not as this user"
    cmdline = [str(a) for a in proc.cmdline()]
    try:
        at = cmdline.index(WORKER_MODULE, 1, 5)
    except ValueError:
        return "not a metal-guard worker (command line)"
    if cmdline[at - 1] != "-m" or "--config" not in cmdline[at + 1:]:
        return "not a metal-guard worker (command line)"
    try:
        config = json.loads(cmdline[cmdline.index("--config", at + 1) + 1])
    except (IndexError, ValueError, RecursionError):
        return "not a metal-guard worker (unreadable --config)"
    if not isinstance(config, dict) or config.get("model_id") != model_id:
        return "a metal-guard worker of another model"
    return None


def kill_orphans(
    orphans: list[OrphanPre], *, grace_sec: float = 5.0, dry_run: bool = False
) -> list[dict[str, Any]]:
    """SIGTERM (then SIGKILL after ``grace_sec``) each running orphan that is verifiably a
    metal-guard worker of this user for its model (:func:`worker_identity_problem`): the pid a
    breadcrumb names is never trusted on its own. Anything else is skipped with the reason."""
    import psutil

    results: list[dict[str, Any]] = []
    for orphan in orphans:
        entry: dict[str, Any] = {"model_id": orphan.model_id, "pid": orphan.pid}
        results.append(entry)
        if orphan.pid is None or orphan.create_time is None:
            entry["action"] = "skipped: no recorded pid/create_time to verify"
            continue
        try:
            proc = psutil.Process(orphan.pid)
            problem = worker_identity_problem(proc, orphan.model_id, orphan.create_time)
            if problem is not None:
                entry["action"] = f"skipped: {problem}"
                continue
            if dry_run:
                entry["action"] = "would terminate"
                continue
            proc.send_signal(signal.SIGTERM)  # psutil refuses if the pid was reused meanwhile
            if _wait_gone(proc, grace_sec):
                entry["action"] = "terminated"
            else:
                proc.kill()
                entry["action"] = "killed" if _wait_gone(proc, 5.0) else "failed: still running after SIGKILL"
        except psutil.NoSuchProcess:
            entry["action"] = "skipped: process already gone"
        except psutil.AccessDenied:
            entry["action"] = "skipped: cannot inspect the process (access denied)"
            continue
        except Exception as exc:  # timeouts
            entry["action"] = f"failed: {type(exc).__name__}: {exc}"
            continue
        _crumb_kill(orphan, entry["action"])
    return results


def _wait_gone(proc: Any, timeout: float) -> bool:
    """Wait until ``proc`` exited (a zombie counts: it is not our child to reap)."""
    import psutil

    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _crumb_kill(orphan: OrphanPre, action: str) -> None:
    try:
        from metal_guard.breadcrumbs import breadcrumb_with_meta

        breadcrumb_with_meta("ORPHAN_KILL", orphan.model_id, pid=orphan.pid, action=action,
                             age_sec=round(orphan.age_sec, 1))
    except Exception:
        log.debug("breadcrumb failed", exc_info=True)
