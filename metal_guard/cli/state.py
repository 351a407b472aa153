"""Cross-process state for the CLI: the L8 lock holder, the L9 breaker and cadence.

* :func:`doctor_section` — the ``state`` section of ``metal-guard doctor``.
* :func:`register` — the ``lock`` and ``breaker`` subcommands (``metal-guard breaker clear``
  is the operator override of an open breaker).

Nothing here initialises the GPU or ingests reports implicitly, except ``breaker check``.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metal_guard.cli import (
    EXIT_COOLDOWN,
    EXIT_FAILED,
    EXIT_GATE_BROKEN,
    EXIT_OK,
    EXIT_WARN,
    add_command,
    emit,
)

if TYPE_CHECKING:
    from metal_guard.breaker import BreakerStatus
    from metal_guard.lock_records import LockHolder


def _lock_summary(holder: LockHolder | None) -> str:
    if holder is None:
        return "free"
    if not holder.verified:
        return f"held by an unverified process ({holder.reason or 'unknown'})"
    return (
        f"held by pid {holder.pid} ({holder.label or 'no label'}) since "
        f"{holder.started_at} on {holder.host}"
    )


def doctor_section() -> dict[str, Any]:
    """Lock holder (or None), breaker status and cadence entry count; read-only.

    A state file that cannot be read is reported as such (``"unreadable: ..."``), never as
    fresh state.
    """
    from metal_guard.breaker import CircuitBreaker
    from metal_guard.cadence import CadenceGuard
    from metal_guard.errors import StateFileError
    from metal_guard.lock import read_mlx_lock
    from metal_guard.settings import get_settings

    holder = read_mlx_lock()
    problem = lock_probe_problem(get_settings().resolved_lock_path) if holder is None else None
    out: dict[str, Any] = {
        "lock": f"unknown: {problem}" if problem else _lock_summary(holder),
        "lock_holder": holder,
    }
    try:
        breaker = CircuitBreaker(auto_ingest=False).status()
        out.update(breaker=_breaker_summary(breaker), breaker_in_cooldown=breaker.in_cooldown,
                   breaker_cooldown_until=breaker.cooldown_until,
                   breaker_recent_failures=breaker.recent_failure_count)
    except StateFileError as exc:
        out.update(breaker=f"unreadable: {exc}", breaker_in_cooldown=None,
                   breaker_cooldown_until=None, breaker_recent_failures=None)
    cadence = CadenceGuard()
    try:
        out["cadence_entries"] = len(cadence.entries())
    except StateFileError as exc:
        out["cadence_entries"] = None
        out["cadence_error"] = f"unreadable: {exc}"
    out["cadence"] = (
        ("risk-scaled" if cadence.min_interval_sec is None else f"{cadence.min_interval_sec:g}s")
        + " between loads of one model, "
        f"{cadence.cross_model_interval_sec:g}s between models (gemma-4 floor 90s); "
        "`metal-guard cadence` lists and resets entries"
    )
    return out


def _breaker_summary(status: BreakerStatus) -> str:
    if status.in_cooldown:
        return (
            f"OPEN after {status.trip_failure_count} GPU failure(s): "
            f"{status.cooldown_remaining_sec:.0f}s remaining"
        )
    return (
        f"closed ({status.recent_failure_count}/{status.panic_threshold} failures "
        f"in the last {status.window_sec:.0f}s)"
    )


# --------------------------------------------------------------------------- subcommands


def lock_probe_problem(path: Path) -> str | None:
    """Why the lock file at ``path`` cannot be probed or taken (``None`` when it can, or is
    absent): not a regular file, or not openable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}"
    from metal_guard.storage import open_nofollow

    try:
        fd = open_nofollow(path)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror or exc}"
    os.close(fd)
    return None


def _run_lock(args: argparse.Namespace) -> int:
    from metal_guard.lock import read_mlx_lock
    from metal_guard.settings import get_settings

    path = get_settings().resolved_lock_path
    holder = read_mlx_lock()
    problem = lock_probe_problem(path) if holder is None else None
    if problem is not None:
        # Never "free" when the probe could not tell: say so, and fail (exit 4).
        emit(args, {"held": None, "holder": None, "error": problem, "lock_path": str(path)},
             f"MLX lock: unknown: {problem}")
        return EXIT_FAILED
    emit(args, {"held": holder is not None, "holder": holder}, f"MLX lock: {_lock_summary(holder)}")
    return EXIT_OK


def _render_breaker(status: BreakerStatus) -> str:
    return (
        f"breaker {_breaker_summary(status)}\n  recent: {status.recent_panic_count} GPU panic(s), "
        f"{status.recent_crash_count} worker crash(es), "
        f"{status.recent_ignored_panic_count} unrelated panic(s) ignored; "
        f"threshold {status.panic_threshold} in {status.window_sec:.0f}s, "
        f"cooldown {status.cooldown_sec:.0f}s"
    )


def _run_breaker(args: argparse.Namespace) -> int:
    from metal_guard.breaker import CircuitBreaker
    from metal_guard.errors import MLXCooldownActive

    breaker = CircuitBreaker()
    action = args.action
    if action == "clear":
        breaker.clear()
        status = breaker.status()
        emit(args, status.as_dict(), "breaker cleared\n" + _render_breaker(status))
        return EXIT_OK
    if action == "check":
        try:
            status = breaker.check()
        except MLXCooldownActive:
            status = breaker.status()
            emit(args, status.as_dict(), _render_breaker(status))
            return EXIT_COOLDOWN
        blind = status.report_scan_errors or []
        emit(args, status.as_dict(), _render_breaker(status)
             + "".join(f"\ncannot see every panic report: {e!a}" for e in blind))
        if blind:  # "closed" from a scan that could not see its window is no answer
            return EXIT_GATE_BROKEN
        return EXIT_WARN if status.recent_failure_count else EXIT_OK
    status = breaker.status()
    emit(args, status.as_dict(), _render_breaker(status))
    return EXIT_COOLDOWN if status.in_cooldown else EXIT_OK


def register(subparsers: Any) -> None:
    lock = add_command(subparsers, "lock", help="show who holds the cross-process MLX lock")
    lock.set_defaults(func=_run_lock)
    breaker = add_command(
        subparsers, "breaker",
        help="show (status), re-scan reports and evaluate (check) or clear the circuit breaker",
    )
    breaker.add_argument("action", nargs="?", choices=("status", "check", "clear"), default="status")
    breaker.set_defaults(func=_run_breaker)
