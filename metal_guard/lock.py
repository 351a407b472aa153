"""L8: one process at a time drives the GPU through a model load/unload.

The lock is a kernel ``flock`` (through :mod:`filelock`) on ``settings.resolved_lock_path``
(``MLX_LOCK_PATH``; default ``<state>/mlx_exclusive.lock``). The kernel drops it when the
holder exits for any reason (including ``SIGKILL`` or a reboot), so there is no stale holder
to clean up and no check-then-write race. Right after acquiring, the holder writes a sidecar
``<lock>.holder.json`` = ``{pid, create_time, label, cmdline, started_at, host}`` describing
itself. The sidecar is only a description: it is believed only when its ``pid`` *and*
``create_time`` match a live process and the kernel lock really is taken (the sidecar and its
verification are :mod:`metal_guard.lock_holder`). Answers are frozen records
(:mod:`metal_guard.lock_records`, re-exported here): :class:`LockHolder` for who holds the
lock, :class:`LockNotAcquired` for an acquire that lets the caller through without it.

Re-entrancy is **per process**: every thread of the holding process passes through, with a
reference count; the kernel lock is released when the count returns to zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metal_guard import storage
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import MLXLockConflict
from metal_guard.lock_holder import (
    describe_holder,
    new_holder,
    probe_free,
    read_sidecar,
    signal_holder,
    unverified_holder,
    verify_holder,
)
from metal_guard.lock_holder import lock_sidecar_path as lock_sidecar_path
from metal_guard.lock_records import LockHolder, LockNotAcquired, LockResult
from metal_guard.settings import OBSERVER, Settings, get_settings

log = logging.getLogger("metal_guard.lock")

__all__ = [
    "LockHolder",
    "LockNotAcquired",
    "LockResult",
    "acquire_mlx_lock",
    "lock_sidecar_path",
    "mlx_exclusive_lock",
    "read_mlx_lock",
    "release_mlx_lock",
]

LABEL_MAX_CHARS = 200
#: Poll interval while waiting for the lock (``timeout > 0``).
ACQUIRE_POLL_SEC = 0.01
#: Poll interval while waiting for a SIGTERMed holder to let go.
FORCE_POLL_SEC = 0.25
#: A busy lock whose sidecar cannot be verified yet (a holder between acquiring and writing
#: its sidecar, or a reader probing the lock) is retried this long before it is a conflict.
UNVERIFIED_GRACE_SEC = 0.5


@dataclass
class _Hold:
    lock: Any  # filelock.BaseFileLock
    path: Path
    depth: int
    holder: dict[str, Any]


_COND = threading.Condition(threading.RLock())
_HOLDS: dict[str, _Hold] = {}
_ACQUIRING: set[str] = set()
_fork_hook_installed = False


def _after_fork_in_child() -> None:
    # filelock closes the inherited descriptor in the child (without unlocking the parent's
    # hold); the child must not believe it holds the lock either.
    global _COND, _HOLDS, _ACQUIRING
    _COND = threading.Condition(threading.RLock())
    _HOLDS = {}
    _ACQUIRING = set()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_installed = True


# --------------------------------------------------------------------------- helpers


def _key(path: Path) -> str:
    return str(Path(path).expanduser().absolute())



def _public(hold: _Hold) -> LockHolder:
    return LockHolder.from_sidecar(hold.holder, hold.path, held_by_this_process=True,
                                   depth=hold.depth)


# --------------------------------------------------------------------------- public API


def read_mlx_lock() -> LockHolder | None:
    """Who holds the L8 lock, or ``None`` when it is free.

    A holder is reported with ``verified=True`` only when the sidecar's pid and create_time
    match a live process; a lock that is busy but described by a stale, forged or missing
    sidecar is reported with ``verified=False, pid=None`` and the ``reason``.
    When the kernel lock is free the answer is ``None`` whatever the sidecar says.
    """
    path = get_settings().resolved_lock_path
    with _COND:
        hold = _HOLDS.get(_key(path))
        if hold is not None:
            return _public(hold)
    free = probe_free(path)
    if free is True:
        return None
    if free is None:
        # Cannot probe without flock: fall back to the sidecar alone, verified.
        claim = read_sidecar(path)
        ok, _reason, _proc = verify_holder(claim, path)
        return describe_holder(path) if ok else None
    return describe_holder(path)


def _validate_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout != timeout or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds (or None to wait forever), not {timeout!r}")
    return float(timeout)


def acquire_mlx_lock(label: str, *, force: bool = False, timeout: float | None = 0,
                     job: str | None = None) -> LockResult:
    """Take the cross-process MLX lock; return the holder record (``acquired=True``), a
    :class:`~metal_guard.lock_records.LockHolder`.

    ``timeout=0`` tries once (a busy lock whose holder is not yet verifiable is retried for
    up to :data:`UNVERIFIED_GRACE_SEC`); ``timeout>0`` waits that long; ``None`` waits forever.
    A second acquire in the same process only increments the reference count.

    ``force=True`` takes over from a holder whose sidecar pid *and* create_time match a live
    process of the same user that owns the lock: SIGTERM, wait up to ``MLX_FORCE_WAIT_SEC``,
    reclaim, then sleep ``MLX_RECLAIM_COOLDOWN_SEC``. Any other holder is never signalled.

    Raises :class:`MLXLockConflict` when the lock stays held elsewhere, except in observer mode
    (``METALGUARD_MODE=observer``), where the conflict is logged and a
    :class:`~metal_guard.lock_records.LockNotAcquired` (``observer=True``) is returned.

    ``job`` (the ranks of one distributed job pass their job key) makes the lock per job: it is
    written to the sidecar, and a rank that finds the lock held by a *verified* holder of the
    same job proceeds under that hold (``acquired=False, job_shared=True``) instead of waiting
    for its own rank — which would deadlock a job whose ranks wait for each other.
    """
    if not isinstance(label, str):
        raise TypeError(f"label must be a string, not {type(label).__name__}")
    label = label[:LABEL_MAX_CHARS]
    wait = _validate_timeout(timeout)
    settings = get_settings()
    path = settings.resolved_lock_path
    key = _key(path)
    deadline = None if wait is None else time.monotonic() + wait
    with _COND:
        _install_fork_hook()
        while True:
            hold = _HOLDS.get(key)
            if hold is not None:
                hold.depth += 1
                log.debug("MLX lock re-entered (%s), depth %d", label, hold.depth)
                return _public(hold)
            if key not in _ACQUIRING:
                _ACQUIRING.add(key)
                break
            # Another thread of this process is taking the kernel lock: wait for its outcome.
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return _conflict(settings, path, label, describe_holder(path), force=force)
            _COND.wait(timeout=remaining)
    try:
        kernel_lock, holder = _take_kernel_lock(settings, path, label, force=force,
                                                deadline=deadline, job=job)
    except _JobShared as shared:
        with _COND:
            _ACQUIRING.discard(key)
            _COND.notify_all()
        log.debug("MLX lock held by pid %s of the same job %s; proceeding under it",
                  shared.holder.pid, job)
        return LockNotAcquired(job_shared=True, job=job, label=label, lock_path=str(path),
                               holder=shared.holder)
    except MLXLockConflict as exc:
        with _COND:
            _ACQUIRING.discard(key)
            _COND.notify_all()
        return _conflict(settings, path, label, exc.holder, force=force, error=exc)
    except BaseException:
        with _COND:
            _ACQUIRING.discard(key)
            _COND.notify_all()
        raise
    with _COND:
        _ACQUIRING.discard(key)
        hold = _Hold(lock=kernel_lock, path=path, depth=1, holder=holder)
        _HOLDS[key] = hold
        _COND.notify_all()
        log.debug("MLX lock acquired by pid %d (%s)", os.getpid(), label)
        return _public(hold)


def _conflict(
    settings: Settings,
    path: Path,
    label: str,
    holder: LockHolder,
    *,
    force: bool,
    error: MLXLockConflict | None = None,
) -> LockNotAcquired:
    if settings.mode == OBSERVER:
        log.warning(
            "observer mode: MLX lock %s is held by pid %s (%s); %r continues without it",
            path, holder.pid, holder.label, label,
        )
        _crumb("LOCK_CONFLICT", label, observer=1, holder_pid=holder.pid,
               holder_label=holder.label, force=int(force))
        return LockNotAcquired(observer=True, label=label, lock_path=str(path), holder=holder)
    if error is not None:
        raise error
    raise _conflict_error(holder)


def _conflict_error(holder: LockHolder) -> MLXLockConflict:
    if holder.pid is None:
        why = holder.force_refused or holder.reason or "no holder description"
        return MLXLockConflict(
            holder, f"MLX lock {holder.lock_path or ''} is held by an unverified process ({why})")
    return MLXLockConflict(holder)


class _JobShared(Exception):
    """The lock is held by a verified rank of our own job."""

    def __init__(self, holder: LockHolder) -> None:
        super().__init__("held by the same job")
        self.holder = holder


def _same_job_holder(path: Path, job: str) -> LockHolder | None:
    claim = read_sidecar(path)
    if not claim or claim.get("job") != job:
        return None
    holder = describe_holder(path)
    return holder if holder.verified and holder.job == job else None


def _take_kernel_lock(
    settings: Settings, path: Path, label: str, *, force: bool, deadline: float | None,
    job: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    import filelock

    storage.ensure_dir(path.parent)
    lock = filelock.FileLock(
        str(path), mode=storage.FILE_MODE, thread_local=False, is_singleton=False
    )
    grace_deadline = time.monotonic() + UNVERIFIED_GRACE_SEC
    reclaimed_from: dict[str, Any] | None = None
    while True:
        if _try(lock):
            break
        if job is not None:
            shared = _same_job_holder(path, job)
            if shared is not None:
                raise _JobShared(shared)
        now = time.monotonic()
        expired = deadline is not None and now >= deadline
        if not (force or expired):
            time.sleep(ACQUIRE_POLL_SEC if deadline is None else min(ACQUIRE_POLL_SEC, deadline - now))
            continue  # plain waiting: no need to inspect the holder on every poll
        claim = read_sidecar(path)
        ok, reason, proc = verify_holder(claim, path)
        if force and ok and claim is not None:
            reclaimed_from = _force_takeover(settings, path, lock, claim, proc)
            break
        if expired and (ok or now >= grace_deadline):
            busy = describe_holder(path) if ok else unverified_holder(path, reason, claim)
            if force:
                busy = busy.replace(force_refused=reason)
                _crumb("LOCK_FORCE_REFUSED", label, reason=reason,
                       claimed_pid=(claim or {}).get("pid"))
            raise _conflict_error(busy)
        step = ACQUIRE_POLL_SEC
        if deadline is not None:
            step = min(step, max(deadline - now, 0.0) or ACQUIRE_POLL_SEC)
        time.sleep(step)
    sidecar = new_holder(label, path)
    if job is not None:
        sidecar["job"] = job
    if reclaimed_from is not None:
        sidecar["reclaimed_from"] = {k: reclaimed_from.get(k) for k in ("pid", "label", "started_at")}
    try:
        storage.write_json(lock_sidecar_path(path), sidecar)
    except BaseException:
        with contextlib.suppress(Exception):
            lock.release(force=True)
        raise
    if reclaimed_from is not None and settings.reclaim_cooldown_sec > 0:
        log.info("reclaimed MLX lock; cooling down %.1fs before use", settings.reclaim_cooldown_sec)
        time.sleep(settings.reclaim_cooldown_sec)
    return lock, sidecar


def _try(lock: Any) -> bool:
    import filelock

    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return False
    return True


def _force_takeover(
    settings: Settings, path: Path, lock: Any, claim: dict[str, Any], proc: Any
) -> dict[str, Any]:
    pid = int(claim["pid"])
    signal_holder(path, claim, proc)
    give_up = time.monotonic() + settings.force_wait_sec
    while True:
        if _try(lock):
            _crumb("LOCK_RECLAIMED", str(claim.get("label", "")), pid=pid)
            return claim
        if time.monotonic() >= give_up:
            holder = describe_holder(path).replace(force_timeout=True)
            if holder.pid not in (None, pid):
                message = f"MLX lock was taken by pid {holder.pid} after pid {pid} was stopped"
            else:
                message = (
                    f"MLX lock holder pid {pid} did not let go within "
                    f"{settings.force_wait_sec:g}s of SIGTERM"
                )
            raise MLXLockConflict(holder, message)
        time.sleep(FORCE_POLL_SEC)


def release_mlx_lock(*, lock_path: Path | None = None) -> bool:
    """Drop one reference to the lock held by this process; free it at zero.

    Returns False when this process does not hold the lock (at ``lock_path``, default the
    configured one), True otherwise.
    """
    path = Path(lock_path) if lock_path is not None else get_settings().resolved_lock_path
    key = _key(path)
    with _COND:
        hold = _HOLDS.get(key)
        if hold is None:
            return False
        hold.depth -= 1
        if hold.depth > 0:
            log.debug("MLX lock reference released, depth %d", hold.depth)
            return True
        del _HOLDS[key]
        try:
            # Remove the description first: a reader never sees our sidecar on a free lock
            # (a crash in between leaves a sidecar of a dead pid, which is never trusted).
            storage.remove(lock_sidecar_path(path))
        except OSError as exc:
            log.warning("could not remove MLX lock sidecar: %s", exc)
        try:
            hold.lock.release(force=True)
        finally:
            _COND.notify_all()
        log.debug("MLX lock released by pid %d", os.getpid())
        return True


@contextlib.contextmanager
def mlx_exclusive_lock(
    label: str, *, force: bool = False, timeout: float | None = 0, job: str | None = None
) -> Iterator[LockResult]:
    """Hold the L8 lock for the duration of the block (re-entrant within the process).

    In observer mode a conflict does not raise: the block runs and the yielded record has
    ``acquired=False`` (a :class:`~metal_guard.lock_records.LockNotAcquired`). With ``job``, a
    rank of the job holding the lock runs under that hold (``job_shared=True``).
    """
    info = acquire_mlx_lock(label, force=force, timeout=timeout, job=job)
    try:
        yield info
    finally:
        if info.acquired and info.lock_path:
            release_mlx_lock(lock_path=Path(info.lock_path))
