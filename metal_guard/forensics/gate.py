"""L10 / L10b: the post-reboot panic cooldown gate.

After a kernel panic and reboot, launchd respawns MLX workloads within minutes and they can
panic the machine again. :func:`evaluate_panic_cooldown` is what a launchd wrapper asks before
starting MLX work (``metal-guard panic-gate``). It needs only the standard library and this
package — it never imports ``mlx``.

Staircase (GPU kernel panics only; every IOGPU signature the classifier knows counts):

* ``>= METALGUARD_PANIC_LOCKOUT_24H_N`` (2) in 24 h, or ``>= ..._LOCKOUT_72H_N`` (3) in 72 h:
  **lockout** until ``metal-guard ack`` (an ack newer than the latest panic and less than
  24 h old) or until ``METALGUARD_PANIC_LOCKOUT_MAX_H`` (72) hours after the earliest panic
  of the window;
* 1 in 24 h: **cooldown** for ``METALGUARD_PANIC_COOLDOWN_STAGE1_H`` (2) hours after it;
* a **sentinel** (written by ``metal-guard postmortem`` or :func:`mark_panic_sentinel_cooldown`)
  holds a cooldown even when the reports have rotated away.

Exit codes: 0 proceed, 2 cooldown/lockout, 3 gate broken (the gate could not see: a reports
directory exists but cannot be listed, a recent panic report cannot be read, a setting is
invalid, the state file cannot be read). ``METALGUARD_PANIC_GATE_DISABLED=1`` always proceeds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from metal_guard.clock import now_ts as _now_ts
from metal_guard.clock import utc_iso
from metal_guard.forensics.records import KERNEL_PANIC, PanicRecord
from metal_guard.migrate import ensure_imported as ensure_legacy_imported
from metal_guard.settings import settings_or_current as _settings

log = logging.getLogger("metal_guard.forensics.gate")

__all__ = [
    "ACK_FILE",
    "EXIT_GATE_BROKEN",
    "EXIT_PANIC_COOLDOWN",
    "EXIT_PROCEED",
    "SENTINEL_FILE",
    "CooldownVerdict",
    "ack_panic_lockout",
    "clear_panic_ack",
    "clear_panic_sentinel",
    "evaluate_panic_cooldown",
    "mark_panic_sentinel_cooldown",
    "read_panic_ack",
    "read_panic_sentinel",
    "scan_recent_aborts",
    "scan_recent_panics",
]

EXIT_PROCEED = 0
EXIT_PANIC_COOLDOWN = 2
EXIT_GATE_BROKEN = 3

SENTINEL_FILE = "panic-sentinel.json"
ACK_FILE = "panic-ack.json"
#: Parsed-report cache (in the cache dir): unchanged files are not re-read on every run.
SCAN_CACHE_FILE = "report-scan-cache.json"  # == forensics.scancache.CACHE_FILE
#: An ack older than this no longer clears a lockout.
ACK_VALID_SEC = 24 * 3600.0
HOUR = 3600.0

PROCEED, COOLDOWN, LOCKOUT, BROKEN, DISABLED, ACKED = (
    "proceed", "cooldown", "lockout", "broken", "disabled", "acked")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)


@dataclass(frozen=True)
class CooldownVerdict:
    """The gate's answer. ``exit_code`` is 0 (proceed), 2 (cooldown/lockout) or 3 (broken).

    ``cooldown_until`` is a UTC epoch (``None`` when proceeding). ``state`` is one of
    ``proceed``, ``cooldown``, ``lockout``, ``acked`` (lockout cleared by an ack),
    ``disabled`` (kill switch) and ``broken``. ``panics`` are the GPU panics of the last 72 h,
    newest first; ``errors`` say why the gate is (or would be) broken.
    """

    exit_code: int
    reason: str
    recent_panics_24h: int = 0
    recent_panics_72h: int = 0
    cooldown_until: float | None = None
    abort_count_24h: int = 0
    state: str = PROCEED
    evaluated_at: float = 0.0
    latest_panic_at: float | None = None
    sentinel_until: float | None = None
    ack_at: float | None = None
    panics: tuple[PanicRecord, ...] = ()
    aborts: tuple[PanicRecord, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def proceed(self) -> bool:
        return self.exit_code == EXIT_PROCEED

    @property
    def remaining_sec(self) -> float:
        if self.cooldown_until is None or self.exit_code != EXIT_PANIC_COOLDOWN:
            return 0.0
        return max(0.0, self.cooldown_until - self.evaluated_at)

    def to_dict(self, *, include_records: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "exit_code": self.exit_code,
            "state": self.state,
            "reason": self.reason,
            "recent_panics_24h": self.recent_panics_24h,
            "recent_panics_72h": self.recent_panics_72h,
            "abort_count_24h": self.abort_count_24h,
            "cooldown_until": self.cooldown_until,
            "cooldown_until_iso": _iso(self.cooldown_until),
            "remaining_sec": round(self.remaining_sec, 3),
            "evaluated_at": _iso(self.evaluated_at),
            "latest_panic_at": _iso(self.latest_panic_at),
            "sentinel_until": _iso(self.sentinel_until),
            "ack_at": _iso(self.ack_at),
            "errors": list(self.errors),
        }
        if include_records:
            data["panics"] = [p.to_dict() for p in self.panics]
            data["aborts"] = [a.to_dict() for a in self.aborts]
        return data


# --------------------------------------------------------------------------- helpers


def _read_state(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read a small state file; ``(None, error)`` when it exists but cannot be read."""
    from metal_guard import storage

    if not path.exists():
        return None, None
    if not os.access(path, os.R_OK):
        return None, f"cannot read {path}: permission denied"
    data: dict[str, Any] = storage.read_json(path, dict)
    return (data or None), None


def _ts_field(data: dict[str, Any] | None, key: str) -> float | None:
    if not data:
        return None
    value = data.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# --------------------------------------------------------------------------- sentinel and ack


def read_panic_sentinel(*, settings: Any = None) -> dict[str, Any] | None:
    """The sentinel state (``cooldown_until_ts`` etc.), or ``None``."""
    return _read_state(_settings(settings).state_file(SENTINEL_FILE))[0]


def mark_panic_sentinel_cooldown(
    duration_hours: float, *, now: datetime | float | None = None, reason: str = "",
    settings: Any = None,
) -> Path:
    """Hold a cooldown for ``duration_hours`` from ``now`` (never shortens an existing one).

    The file records ``cooldown_until_ts`` (epoch, readable by the bash ``mlx-safe-python``)
    and ``cooldown_until`` (ISO). Returns its path.
    """
    from metal_guard import storage

    if not isinstance(duration_hours, int | float) or duration_hours < 0:
        raise ValueError(f"duration_hours must be a number >= 0, got {duration_hours!r}")
    path = _settings(settings).state_file(SENTINEL_FILE)
    now_ts = _now_ts(now)
    until = now_ts + float(duration_hours) * HOUR

    def update(state: dict[str, Any]) -> dict[str, Any]:
        old = _ts_field(state, "cooldown_until_ts")
        if old is not None and old > until and old > now_ts:
            return state
        return {"cooldown_until_ts": until, "cooldown_until": _iso(until),
                "created_at_ts": now_ts, "created_at": _iso(now_ts),
                "reason": str(reason)[:500]}

    storage.update_json(path, update, dict)
    return path


def clear_panic_sentinel(*, settings: Any = None) -> bool:
    from metal_guard import storage

    return storage.remove(_settings(settings).state_file(SENTINEL_FILE))


def read_panic_ack(*, settings: Any = None) -> dict[str, Any] | None:
    return _read_state(_settings(settings).state_file(ACK_FILE))[0]


def ack_panic_lockout(
    *, now: datetime | float | None = None, note: str = "", settings: Any = None
) -> Path:
    """Acknowledge the panics so far: clears a lockout for panics older than the ack (24 h)."""
    from metal_guard import storage

    path = _settings(settings).state_file(ACK_FILE)
    ts = _now_ts(now)
    storage.write_json(path, {"acked_at_ts": ts, "acked_at": _iso(ts), "pid": os.getpid(),
                              "note": str(note)[:500]})
    return path


def clear_panic_ack(*, settings: Any = None) -> bool:
    from metal_guard import storage

    return storage.remove(_settings(settings).state_file(ACK_FILE))


# --------------------------------------------------------------------------- scans


def _scan(s: Any, now_ts: float, panic_hours: float, abort_hours: float | None,
          dirs: Any = None) -> Any:
    from metal_guard.forensics.reports import scan_reports

    kinds = frozenset({"panic", "crash"}) if abort_hours is not None else frozenset({"panic"})
    return scan_reports(
        s.report_dirs if dirs is None else dirs,
        panic_since_ts=now_ts - panic_hours * HOUR,
        crash_since_ts=now_ts - (abort_hours or 0.0) * HOUR,
        kinds=kinds, now=now_ts, cache_path=s.cache_file(SCAN_CACHE_FILE),
    )


def scan_recent_panics(
    hours: float = 72.0, *, now: datetime | float | None = None, gpu_only: bool = True,
    settings: Any = None,
) -> list[PanicRecord]:
    """GPU kernel panics (every IOGPU signature) of the last ``hours``, newest first."""
    s = _settings(settings)
    result = _scan(s, _now_ts(now), hours, None)
    return [r for r in result.panics if r.is_gpu or not gpu_only]


def scan_recent_aborts(
    hours: float = 24.0, *, now: datetime | float | None = None, gpu_only: bool = True,
    settings: Any = None,
) -> list[PanicRecord]:
    """GPU/Metal process aborts and GPU restarts (``.ips``) of the last ``hours``.

    They do not gate anything; the count is ``CooldownVerdict.abort_count_24h``.
    """
    s = _settings(settings)
    now_ts = _now_ts(now)
    result = _scan(s, now_ts, 0.0, hours)
    return [r for r in result.crashes if r.is_gpu or not gpu_only]


# --------------------------------------------------------------------------- the verdict


def evaluate_panic_cooldown(
    *, now: datetime | float | None = None, settings: Any = None, report_dirs: Any = None
) -> CooldownVerdict:
    """Decide whether MLX work may start now. Never raises: a failure is exit code 3."""
    now_ts = _now_ts(now)
    try:
        s = _settings(settings)
    except Exception as exc:  # SettingsError: an invalid METALGUARD_* value
        return CooldownVerdict(EXIT_GATE_BROKEN, f"configuration error: {exc}",
                               state=BROKEN, evaluated_at=now_ts, errors=(str(exc),))
    if s.panic_gate_disabled:
        return CooldownVerdict(EXIT_PROCEED, "gate disabled by METALGUARD_PANIC_GATE_DISABLED=1",
                               state=DISABLED, evaluated_at=now_ts)
    try:
        return _evaluate(s, now_ts, report_dirs)
    except Exception as exc:  # a bug must not look like "proceed"
        log.debug("panic gate failed", exc_info=True)
        return CooldownVerdict(EXIT_GATE_BROKEN, f"internal error: {type(exc).__name__}: {exc}",
                               state=BROKEN, evaluated_at=now_ts, errors=(repr(exc),))


def _evaluate(s: Any, now_ts: float, report_dirs: Any) -> CooldownVerdict:
    ensure_legacy_imported(s)  # a metal-guard 0.11 cooldown on disk is honoured (migrate.py)
    result = _scan(s, now_ts, 72.0, 24.0, report_dirs)
    errors = list(result.errors)
    gpu = [r for r in result.records if r.kind == KERNEL_PANIC and r.is_gpu]
    aborts = [r for r in result.crashes if r.is_gpu]
    c24 = sum(1 for r in gpu if r.timestamp >= now_ts - 24 * HOUR)
    c72 = len(gpu)
    latest = max((r.timestamp for r in gpu), default=None)
    earliest = min((r.timestamp for r in gpu), default=None)

    sentinel, err = _read_state(s.state_file(SENTINEL_FILE))
    if err:
        errors.append(err)
    ack, err = _read_state(s.state_file(ACK_FILE))
    if err:
        errors.append(err)
    sentinel_until = _ts_field(sentinel, "cooldown_until_ts")
    ack_at = _ts_field(ack, "acked_at_ts")

    common: dict[str, Any] = dict(
        recent_panics_24h=c24, recent_panics_72h=c72, abort_count_24h=len(aborts),
        evaluated_at=now_ts, latest_panic_at=latest, ack_at=ack_at,
        sentinel_until=sentinel_until if sentinel_until and sentinel_until > now_ts else None,
        panics=tuple(gpu), aborts=tuple(aborts), errors=tuple(errors),
    )
    reasons: list[str] = []
    until: float | None = None
    state = PROCEED
    if c24 >= s.panic_lockout_24h_n or c72 >= s.panic_lockout_72h_n:
        assert earliest is not None and latest is not None
        lockout_until = earliest + s.panic_lockout_max_h * HOUR
        ack_ok = ack_at is not None and ack_at > latest and now_ts - ack_at < ACK_VALID_SEC
        what = f"{c24} GPU kernel panic(s) in 24 h, {c72} in 72 h"
        if ack_ok:
            state, ack_note = ACKED, f"lockout ({what}) cleared by ack at {_iso(ack_at)}"
            reasons.append(ack_note)
        elif now_ts < lockout_until:
            state, until = LOCKOUT, lockout_until
            reasons.append(f"{what}; run `metal-guard ack` after investigating "
                           f"(or wait until {_iso(lockout_until)})")
    if state == PROCEED and c24 >= 1 and latest is not None:
        stage1_until = latest + s.panic_cooldown_stage1_h * HOUR
        if now_ts < stage1_until:
            state, until = COOLDOWN, stage1_until
            reasons.append(f"GPU kernel panic at {_iso(latest)}; "
                           f"{s.panic_cooldown_stage1_h:g} h cooldown until {_iso(stage1_until)}")
    if sentinel_until is not None and sentinel_until > now_ts:
        reasons.append(f"cooldown sentinel until {_iso(sentinel_until)}"
                       + (f" ({sentinel.get('reason')})" if sentinel and sentinel.get("reason") else ""))
        until = max(until or 0.0, sentinel_until)
        if state in (PROCEED, ACKED):
            state = COOLDOWN
    if state in (COOLDOWN, LOCKOUT):
        return CooldownVerdict(EXIT_PANIC_COOLDOWN, "; ".join(reasons), cooldown_until=until,
                               state=state, **common)
    if errors:
        return CooldownVerdict(EXIT_GATE_BROKEN, "; ".join(errors),
                               state=BROKEN, **common)
    if state == ACKED:
        return CooldownVerdict(EXIT_PROCEED, reasons[0], state=ACKED, **common)
    if c72:
        reason = f"no active cooldown ({c72} GPU kernel panic(s) in 72 h, none gating)"
    else:
        reason = "no recent IOGPU kernel panics"
    if aborts:
        reason += f"; {len(aborts)} GPU process abort(s) in 24 h"
    return CooldownVerdict(EXIT_PROCEED, reason, state=PROCEED, **common)
