"""Who holds the L8 lock, and may we believe them? The holder sidecar and its verification.

Right after taking the kernel lock, the holder writes ``<lock>.holder.json`` =
``{pid, create_time, label, cmdline, started_at, host, lock_path}``. The sidecar is only a
description: :func:`verify_holder` believes it only when its ``pid`` *and* ``create_time``
match a live, non-zombie process and — on Linux, per ``/proc/locks`` matched by device *and*
inode — that pid owns the kernel ``flock`` on this very file. :func:`signal_holder` SIGTERMs a
verified holder only when it is an ordinary process of the same user that visibly uses
metal-guard (command line, or the lock file open). The lock itself (acquire, release, re-entrancy) is :mod:`metal_guard.lock`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metal_guard import storage
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import MLXLockConflict
from metal_guard.lock_records import LockHolder
from metal_guard.settings import get_settings

log = logging.getLogger("metal_guard.lock_holder")

__all__ = [
    "CREATE_TIME_TOLERANCE_SEC",
    "SIDECAR_SUFFIX",
    "describe_holder",
    "elapsed_s",
    "flock_owner_pids",
    "holds_open",
    "lock_sidecar_path",
    "may_signal",
    "new_holder",
    "probe_free",
    "read_sidecar",
    "signal_holder",
    "unverified_holder",
    "uses_metal_guard",
    "verify_holder",
]

SIDECAR_SUFFIX = ".holder.json"
CMDLINE_MAX_CHARS = 500
#: ``create_time`` values closer than this describe the same process.
CREATE_TIME_TOLERANCE_SEC = 0.05


def lock_sidecar_path(lock_path: Path | None = None) -> Path:
    """The holder sidecar next to ``lock_path`` (default: the configured lock)."""
    path = Path(lock_path) if lock_path is not None else get_settings().resolved_lock_path
    return path.with_name(path.name + SIDECAR_SUFFIX)



# --------------------------------------------------------------------------- describing ourselves


_SELF_IDENTITY: dict[int, tuple[float | None, str]] = {}


def _self_identity() -> tuple[float | None, str]:
    """``(create_time, cmdline)`` of this process, computed once per pid."""
    pid = os.getpid()
    cached = _SELF_IDENTITY.get(pid)
    if cached is None:
        create_time: float | None = None
        cmdline = " ".join(sys.argv)
        try:
            import psutil

            proc = psutil.Process(pid)
            create_time = proc.create_time()
            cmdline = " ".join(proc.cmdline()) or cmdline
        except Exception as exc:  # pragma: no cover - psutil always works on our platforms
            log.debug("cannot describe own process: %s", exc)
        cached = (create_time, cmdline[:CMDLINE_MAX_CHARS])
        _SELF_IDENTITY.clear()
        _SELF_IDENTITY[pid] = cached
    return cached


def new_holder(label: str, path: Path) -> dict[str, Any]:
    """The sidecar record describing this process as the holder of the lock at ``path``."""
    create_time, cmdline = _self_identity()
    return {
        "pid": os.getpid(),
        "create_time": create_time,
        "label": label,
        "cmdline": cmdline,
        "started_at": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "lock_path": str(path),
    }


def elapsed_s(started_at: Any) -> float | None:
    """Seconds since an aware ISO timestamp, or ``None`` if it is not one."""
    try:
        started = datetime.fromisoformat(str(started_at))
    except ValueError:
        return None
    if started.tzinfo is None:
        return None
    return round((datetime.now(UTC) - started).total_seconds(), 3)


# --------------------------------------------------------------------------- verification


def _valid_sidecar(obj: Any) -> bool:
    pid = obj.get("pid")
    ct = obj.get("create_time")
    return (
        isinstance(pid, int)
        and not isinstance(pid, bool)
        and (ct is None or (isinstance(ct, (int, float)) and not isinstance(ct, bool)))
    )


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's claim, or None. A corrupt or foreign sidecar is quarantined."""
    sidecar = lock_sidecar_path(path)
    try:
        data = storage.read_json(sidecar, lambda: None, expect=dict, validate=_valid_sidecar)
    except OSError as exc:  # e.g. another user's 0600 sidecar: an unverifiable claim
        log.debug("cannot read lock sidecar %s: %s", sidecar, exc)
        return None
    return data if isinstance(data, dict) else None


def _lock_line_owner(line: str) -> tuple[int, tuple[int, int, int]] | None:
    """``(pid, (major, minor, inode))`` of one holder line of /proc/locks, or None.

    A line reads ``1: FLOCK  ADVISORY  WRITE 12957 fe:00:2146332 0 EOF``: the device is
    ``MAJOR:MINOR`` in hex, the inode in decimal. Waiters (``->``) and other lock kinds are
    skipped.
    """
    parts = line.split()
    if len(parts) < 6 or parts[1] == "->" or "FLOCK" not in parts:
        return None
    i = parts.index("FLOCK")
    try:
        pid = int(parts[i + 3])
        major, minor, inode = parts[i + 4].split(":")
        return pid, (int(major, 16), int(minor, 16), int(inode))
    except (IndexError, ValueError):
        return None


def _file_id(st: os.stat_result) -> tuple[int, int, int]:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def flock_owner_pids(path: Path, *, locks_text: str | None = None) -> set[int] | None:
    """Linux only: pids owning an ``flock`` on ``path`` per /proc/locks (None = unknown).

    A lock line matches only when its device (``MAJOR:MINOR``) *and* inode are the file's:
    an inode number alone is shared by files on other filesystems, and trusting it let a
    forged sidecar name any process locking a same-inode file elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        wanted = _file_id(os.stat(path))
        text = Path("/proc/locks").read_text() if locks_text is None else locks_text
    except OSError:
        return None
    pids: set[int] = set()
    found = False
    for line in text.split("\n"):
        entry = _lock_line_owner(line)
        if entry is not None and entry[1] == wanted:
            found = True
            pids.add(entry[0])
    # The file may be reported under another device (overlay/btrfs subvolumes): unknown,
    # not "nobody"; :func:`holds_open` then decides.
    return pids if found else None


def holds_open(pid: int, path: Path) -> bool | None:
    """Does ``pid`` have ``path`` (this device and inode) open? None when it cannot be told.

    Linux reads ``/proc/<pid>/fd`` (stat follows each descriptor to the file it refers to);
    elsewhere psutil's open-file list is compared by device and inode.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    wanted = (st.st_dev, st.st_ino)
    fd_dir = Path(f"/proc/{pid}/fd")
    if sys.platform.startswith("linux") and Path("/proc/self/fd").is_dir():
        try:
            names = os.listdir(fd_dir)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        for name in names:
            try:
                fst = os.stat(fd_dir / name)
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == wanted:
                return True
        return False
    try:
        import psutil

        files = psutil.Process(pid).open_files()
    except Exception:
        return None
    for item in files:
        try:
            fst = os.stat(item.path)
        except OSError:
            continue
        if (fst.st_dev, fst.st_ino) == wanted:
            return True
    return False


def verify_holder(claim: dict[str, Any] | None, path: Path) -> tuple[bool, str, Any]:
    """Is ``claim`` a live process that holds the lock? Returns ``(ok, reason, psutil.Process)``.

    The claim must name a live, non-zombie pid whose create_time matches, and that pid must
    own the kernel lock on *this* file (device and inode) per /proc/locks — or, where the
    kernel reports the file under another device, have this file open.
    """
    if claim is None:
        return False, "no holder sidecar", None
    import psutil

    pid = claim.get("pid")
    create_time = claim.get("create_time")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False, "sidecar has no valid pid", None
    if create_time is None:
        return False, "sidecar has no create_time", None
    try:
        proc = psutil.Process(pid)
        real_create_time = proc.create_time()
        status = proc.status()
    except psutil.NoSuchProcess:
        return False, f"pid {pid} is not alive (stale sidecar)", None
    except (psutil.AccessDenied, OSError) as exc:
        return False, f"pid {pid} cannot be inspected ({type(exc).__name__})", None
    if status == psutil.STATUS_ZOMBIE:
        return False, f"pid {pid} is a zombie", None
    if abs(real_create_time - float(create_time)) > CREATE_TIME_TOLERANCE_SEC:
        return False, f"pid {pid} was started at another time (pid reused or forged sidecar)", None
    owners = flock_owner_pids(path)
    if owners is not None:
        if pid not in owners:
            return False, f"pid {pid} does not own the kernel lock on {path}", None
    elif holds_open(pid, path) is False:
        return False, f"pid {pid} does not have the lock file {path} open", None
    return True, "verified", proc


def probe_free(path: Path) -> bool | None:
    """Is the kernel lock free right now? ``None`` if this cannot be told.

    While the probe holds a shared lock nobody can hold the exclusive one, so a sidecar left
    by a dead holder is removed then.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-Unix
        return None
    try:
        fd = storage.open_nofollow(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.debug("cannot open lock %s to probe it: %s", path, exc)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.debug("cannot probe lock %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):
            if storage.remove(lock_sidecar_path(path)):
                log.info("removed the sidecar of a holder that no longer holds %s", path)
        return True
    finally:
        os.close(fd)  # also drops the shared lock


def describe_holder(path: Path) -> LockHolder:
    """What we can say about whoever holds the kernel lock at ``path`` (held elsewhere)."""
    claim = read_sidecar(path)
    ok, reason, _proc = verify_holder(claim, path)
    if ok and claim is not None:
        return LockHolder.from_sidecar(claim, path, held_by_this_process=False)
    return unverified_holder(path, reason, claim)


def unverified_holder(path: Path, reason: str, claim: dict[str, Any] | None) -> LockHolder:
    """The record of a busy lock whose sidecar cannot be believed (``pid=None``)."""
    return LockHolder(held=True, verified=False, held_by_this_process=False, pid=None,
                      label=None, reason=reason, claimed=claim, lock_path=str(path))


# --------------------------------------------------------------------------- signalling


#: A process whose command line contains one of these visibly runs metal-guard.
METAL_GUARD_MARKERS = ("metal_guard", "metal-guard", "mlx-safe-python")


def uses_metal_guard(proc: Any, path: Path | None = None) -> tuple[bool, str]:
    """Does ``proc`` visibly use metal-guard? Its command line names it (``python -m
    metal_guard...``, ``metal-guard run``, ``mlx-safe-python``, a script importing
    ``metal_guard`` on ``-c``), or it has this very lock file open (device and inode)."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception as exc:
        return False, f"cannot read the command line of pid {proc.pid} ({type(exc).__name__})"
    if any(marker in cmdline for marker in METAL_GUARD_MARKERS):
        return True, "command line names metal-guard"
    if path is not None and holds_open(proc.pid, path) is True:
        return True, "has the lock file open"
    return False, (f"pid {proc.pid} shows no sign of using metal-guard "
                   f"(command line {cmdline[:120]!r})")


def may_signal(proc: Any, path: Path | None = None) -> tuple[bool, str]:
    """Only a verified, ordinary process of our own user (real and effective uid) that
    visibly uses metal-guard (:func:`uses_metal_guard`) may be SIGTERMed by ``force=True``."""
    pid = proc.pid
    if pid <= 1:
        return False, f"refusing to signal pid {pid}"
    if pid == os.getpid():
        return False, "refusing to signal this process"
    getuid = getattr(os, "getuid", None)
    if getuid is not None:
        try:
            uids = proc.uids()
            if uids.real != getuid() or uids.effective != os.geteuid():
                return False, f"pid {pid} belongs to another user"
        except Exception as exc:
            return False, f"cannot read the owner of pid {pid} ({type(exc).__name__})"
    ok, why = uses_metal_guard(proc, path)
    if not ok:
        return False, why
    return True, "same user, uses metal-guard"


def signal_holder(path: Path, claim: dict[str, Any], proc: Any) -> None:
    """SIGTERM the verified holder ``proc`` (described by ``claim``) of the lock at ``path``.

    Raises :class:`MLXLockConflict` when :func:`may_signal` refuses or the signal is not
    permitted; a holder that exited meanwhile is not an error.
    """
    pid = int(claim["pid"])
    allowed, why = may_signal(proc, path)
    if not allowed:
        holder = describe_holder(path).replace(force_refused=why)
        _crumb("LOCK_FORCE_REFUSED", str(claim.get("label", "")), pid=pid, reason=why)
        raise MLXLockConflict(holder, f"MLX lock is held by pid {pid}; force refused: {why}")
    import psutil

    log.warning("force: sending SIGTERM to MLX lock holder pid %d (%s)", pid, claim.get("label"))
    _crumb("LOCK_FORCE", str(claim.get("label", "")), pid=pid)
    try:
        # psutil re-checks the process identity (pid + create time) right before signalling.
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass  # exited on its own meanwhile
    except (psutil.AccessDenied, PermissionError):
        holder = describe_holder(path).replace(force_permission_denied=True)
        raise MLXLockConflict(holder, f"not permitted to signal MLX lock holder pid {pid}")
