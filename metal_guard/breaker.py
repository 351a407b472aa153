"""L9 circuit breaker: refuse new MLX work after a cluster of GPU failures.

Two kinds of failure are counted, one point each, in a rolling window:

* **GPU kernel panics** from the panic archive ``<state>/panics.jsonl`` — records whose
  ``is_gpu`` is true (the classifier matched an IOGPU panic or a GPU abort). Unrelated
  panics are archived too but never counted. :func:`ingest_panics_jsonl` fills the archive
  from the macOS diagnostic reports (``check()`` runs it first, best effort).
* **Worker crashes** reported by the isolation layer with :meth:`CircuitBreaker.record_failure`
  (a worker killed by SIGABRT/SIGSEGV/a GPU error). A ``process_crash`` report in the archive
  that names the same pid within :data:`CRASH_DEDUP_SEC` is the same event and counts once.

When ``panic_threshold`` failures fall within ``window_sec`` of each other, the breaker trips
at the time of the failure that completed the cluster and stays open for ``cooldown_sec`` from
then (not from when someone noticed). ``clear()`` is the operator override: failures before
it no longer count. State is persisted in ``<state>/breaker.json``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metal_guard import storage
from metal_guard._results import ResultRecord
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import MLXCooldownActive, SettingsError
from metal_guard.forensics.records import PROCESS_CRASH, PanicRecord
from metal_guard.migrate import ensure_imported as ensure_legacy_imported
from metal_guard.settings import get_settings

log = logging.getLogger("metal_guard.breaker")

__all__ = ["BreakerStatus", "CircuitBreaker", "ingest_panics_jsonl", "read_panic_archive"]

BREAKER_FILE = "breaker.json"
PANICS_FILE = "panics.jsonl"
#: A recorded crash and an archived crash report of the same pid this close are one event.
CRASH_DEDUP_SEC = 300.0
#: At most this many recorded failures are kept in breaker.json.
MAX_FAILURES_KEPT = 200
DETAIL_MAX_CHARS = 500
#: Only the tail of a huge archive is read.
ARCHIVE_MAX_BYTES = 8 << 20


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_state(obj: Any) -> bool:
    for key in ("cooldown_until", "entered_at", "cleared_at", "window_sec"):
        if obj.get(key) is not None and not _is_num(obj[key]):
            return False
    for key in ("panic_count", "threshold"):
        if obj.get(key) is not None and not _is_num(obj[key]):
            return False
    failures = obj.get("failures", [])
    return isinstance(failures, list) and all(
        isinstance(f, dict) and _is_num(f.get("ts")) for f in failures
    )


def _positive(name: str, value: float | None, default: float, *, minimum: float) -> float:
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(name, value, f"a finite number >= {minimum:g}")
    if value < minimum:
        raise SettingsError(name, value, f"a number >= {minimum:g}")
    return float(value)


# --------------------------------------------------------------------------- panic archive


def _default_archive() -> Path:
    return get_settings().state_file(PANICS_FILE)


def _load_archive(path: Path) -> tuple[list[PanicRecord], int]:
    """The archive's records (its last :data:`ARCHIVE_MAX_BYTES`) and how many complete lines
    are not records. Raises :class:`~metal_guard.errors.StateFileError` when it cannot be read."""
    lines, skipped = storage.read_jsonl_counted(path, max_bytes=ARCHIVE_MAX_BYTES)
    records: list[PanicRecord] = []
    for line in lines:
        try:
            records.append(PanicRecord.from_dict(line))
        except (ValueError, TypeError, AttributeError, RecursionError):
            skipped += 1
    return records, skipped


def read_panic_archive(jsonl_path: Path | str | None = None, *, repair: bool = False) -> list[PanicRecord]:
    """The archived records; lines that are not records are skipped.

    With ``repair=True`` an archive holding such lines (a torn write, a foreign file) is
    quarantined (``*.corrupt-<ts>``, one warning) and rewritten with the good records only.
    """
    path = Path(jsonl_path) if jsonl_path is not None else _default_archive()
    records, skipped = _load_archive(path)
    if not skipped:
        return records
    if not repair:
        log.debug("%d unreadable line(s) in %s", skipped, path)
        return records
    with storage.locked(path):
        return _repair_locked(path)


def _repair_locked(path: Path) -> list[PanicRecord]:
    """Quarantine an archive with junk lines and keep its good records (lock held by caller)."""
    records, skipped = _load_archive(path)
    if skipped and storage.quarantine(path, f"{skipped} line(s) are not panic records"):
        text = "".join(json.dumps(r.to_dict(), sort_keys=True, default=str) + "\n" for r in records)
        storage.write_text_atomic(path, text)
    return records


def _secondary_key(record: PanicRecord) -> tuple[str, int, int] | None:
    # A report moved to Retired/ keeps its pid and time but not its path.
    if record.pid is None:
        return None
    return (record.kind, int(record.timestamp), record.pid)


def _parse_reports(report_dir: Path | None, since_ts: float | None,
                   scan_errors: list[str] | None = None) -> list[PanicRecord]:
    from metal_guard.forensics.reports import parse_panic_reports

    kwargs: dict[str, Any] = {"errors": scan_errors}
    if since_ts is not None:
        try:
            if "since_ts" in inspect.signature(parse_panic_reports).parameters:
                kwargs["since_ts"] = since_ts
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            pass
    if report_dir is not None:
        return list(parse_panic_reports(report_dir, **kwargs))
    return list(parse_panic_reports(**kwargs))


def ingest_panics_jsonl(
    *,
    report_dir: Path | str | None = None,
    jsonl_path: Path | str | None = None,
    records: Iterable[PanicRecord | dict[str, Any]] | None = None,
    since_ts: float | None = None,
    scan_errors: list[str] | None = None,
) -> int:
    """Append new panic/crash records to the archive; return how many were added.

    ``records`` defaults to what :func:`metal_guard.forensics.reports.parse_panic_reports`
    finds (in ``report_dir``, default the configured report directories). Records already in
    the archive — same :attr:`PanicRecord.identity`, or same kind, second and pid — are
    skipped; the whole read-check-append runs under the archive's storage lock. A report
    parser failure is logged and counts as nothing found. Why the report scan could not see
    its whole window is appended to ``scan_errors`` when given.
    """
    path = Path(jsonl_path) if jsonl_path is not None else _default_archive()
    if records is None:
        try:
            records = _parse_reports(Path(report_dir) if report_dir is not None else None, since_ts,
                                     scan_errors)
        except ImportError as exc:
            log.debug("panic report parser unavailable: %s", exc)
            return 0
        except Exception as exc:
            log.warning("could not scan panic reports: %s: %s", type(exc).__name__, exc)
            return 0
    incoming: list[PanicRecord] = []
    for item in records:
        if isinstance(item, PanicRecord):
            incoming.append(item)
            continue
        try:
            incoming.append(PanicRecord.from_dict(item))  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            log.warning("ignoring a panic record that cannot be read: %s", exc)
    if not incoming:
        return 0
    added = 0
    with storage.locked(path):
        existing, skipped = _load_archive(path)
        if skipped:
            existing = _repair_locked(path)
        seen = {r.identity for r in existing}
        seen_secondary = {k for k in map(_secondary_key, existing) if k is not None}
        for record in incoming:
            secondary = _secondary_key(record)
            if record.identity in seen or (secondary is not None and secondary in seen_secondary):
                continue
            storage.append_jsonl(path, record.to_dict())
            seen.add(record.identity)
            if secondary is not None:
                seen_secondary.add(secondary)
            added += 1
    if added:
        log.info("archived %d new panic/crash record(s) in %s", added, path)
    return added


# --------------------------------------------------------------------------- breaker


@dataclass(frozen=True, eq=False)
class BreakerStatus(ResultRecord):
    """What :meth:`CircuitBreaker.status` / :meth:`~CircuitBreaker.check` /
    :meth:`~CircuitBreaker.record_failure` report (``as_dict()`` for JSON; reading it as the
    0.11 dict, ``status["in_cooldown"]``, still works)."""

    in_cooldown: bool
    #: ``"open"`` while cooling down, else ``"closed"``
    state: str
    cooldown_until: float | None
    cooldown_remaining_sec: float
    tripped_at: float | None
    trip_failure_count: int
    panic_threshold: int
    window_sec: float
    cooldown_sec: float
    recent_panic_count: int
    recent_crash_count: int
    recent_failure_count: int
    recent_ignored_panic_count: int
    cleared_at: float | None
    state_path: str
    jsonl_path: str
    #: ``check()`` only: why the report scan could not see its whole window (empty: it could)
    report_scan_errors: list[str] | None = dataclasses.field(default=None,
                                                             metadata={"omit_none": True})



class CircuitBreaker:
    """Refuse new MLX workers after ``panic_threshold`` GPU failures within ``window_sec``.

    ``None`` parameters come from the settings (``METALGUARD_BREAKER_*``). ``clock`` (default
    :func:`time.time`) supplies "now" for methods called without ``now=``. ``auto_ingest``
    makes :meth:`check` archive new diagnostic reports first.
    """

    def __init__(
        self,
        *,
        window_sec: float | None = None,
        panic_threshold: int | None = None,
        cooldown_sec: float | None = None,
        state_path: Path | str | None = None,
        jsonl_path: Path | str | None = None,
        clock: Callable[[], float] | None = None,
        auto_ingest: bool = True,
    ) -> None:
        settings = get_settings()
        self.window_sec = _positive("window_sec", window_sec, settings.breaker_window_sec, minimum=1e-9)
        threshold = _positive(
            "panic_threshold", panic_threshold, settings.breaker_panic_threshold, minimum=1
        )
        if threshold != int(threshold):
            raise SettingsError("panic_threshold", panic_threshold, "a whole number >= 1")
        self.panic_threshold = int(threshold)
        self.cooldown_sec = _positive("cooldown_sec", cooldown_sec, settings.breaker_cooldown_sec, minimum=0)
        self.state_path = Path(state_path) if state_path is not None else settings.state_file(BREAKER_FILE)
        self.jsonl_path = Path(jsonl_path) if jsonl_path is not None else settings.state_file(PANICS_FILE)
        self._clock = clock or time.time
        self.auto_ingest = auto_ingest
        #: Why the last :meth:`ingest` could not see every report of its window (empty: it could).
        self.last_scan_errors: list[str] = []

    def _now(self, now: float | None) -> float:
        return float(now) if now is not None else float(self._clock())

    def _read_state(self) -> dict[str, Any]:
        return storage.read_json(self.state_path, dict, expect=dict, validate=_valid_state)

    # ------------------------------------------------------------------ evaluation

    def _events(
        self, state: dict[str, Any], now: float, *, repair: bool = False
    ) -> tuple[list[tuple[float, str]], int]:
        """Counted failures ``[(ts, "panic"|"crash")]`` in the horizon, plus ignored panics in the window."""
        horizon = now - (self.window_sec + self.cooldown_sec)
        cleared = state.get("cleared_at")
        floor = max(horizon, cleared) if cleared is not None else horizon
        failures = [f for f in state.get("failures", []) if f["ts"] > floor]
        crash_pids = [(f["ts"], f.get("pid")) for f in failures if isinstance(f.get("pid"), int)]
        events = [(min(float(f["ts"]), now), "crash") for f in failures]
        ignored = 0
        for rec in read_panic_archive(self.jsonl_path, repair=repair):
            if rec.timestamp <= floor:
                continue
            if not rec.is_gpu:
                ignored += rec.timestamp > now - self.window_sec
                continue
            if rec.kind == PROCESS_CRASH and any(
                pid == rec.pid and abs(ts - rec.timestamp) <= CRASH_DEDUP_SEC for ts, pid in crash_pids
            ):
                continue  # the same crash, already recorded by the isolation layer
            events.append((min(rec.timestamp, now), "panic"))
        events.sort()
        return events, ignored

    def _evaluate(self, state: dict[str, Any], now: float, *, repair: bool = False) -> BreakerStatus:
        events, ignored = self._events(state, now, repair=repair)
        times = [ts for ts, _ in events]
        k = self.panic_threshold
        tripped_at: float | None = None
        trip_count = 0
        for j in range(k - 1, len(times)):
            if times[j] - times[j - k + 1] <= self.window_sec:
                tripped_at = times[j]
                trip_count = sum(1 for t in times if tripped_at - self.window_sec <= t <= tripped_at)
        cooldown_until = tripped_at + self.cooldown_sec if tripped_at is not None else None
        persisted = state.get("cooldown_until")
        if persisted is not None and (cooldown_until is None or persisted > cooldown_until):
            cooldown_until = float(persisted)
            tripped_at = state.get("entered_at", tripped_at)
            trip_count = int(state.get("panic_count") or trip_count)
        in_window = [kind for ts, kind in events if ts > now - self.window_sec]
        active = cooldown_until is not None and now < cooldown_until
        return BreakerStatus(
            in_cooldown=active,
            state="open" if active else "closed",
            cooldown_until=cooldown_until if active else None,
            cooldown_remaining_sec=round(cooldown_until - now, 3) if active and cooldown_until else 0.0,
            tripped_at=tripped_at if active else None,
            trip_failure_count=trip_count if active else 0,
            panic_threshold=k,
            window_sec=self.window_sec,
            cooldown_sec=self.cooldown_sec,
            recent_panic_count=in_window.count("panic"),
            recent_crash_count=in_window.count("crash"),
            recent_failure_count=len(in_window),
            recent_ignored_panic_count=ignored,
            cleared_at=state.get("cleared_at"),
            state_path=str(self.state_path),
            jsonl_path=str(self.jsonl_path),
        )

    def _persist_trip(self, status: BreakerStatus, now: float) -> None:
        until = status.cooldown_until

        def apply(state: dict[str, Any]) -> None:
            if state.get("cooldown_until") == until:
                return
            state.update(
                cooldown_until=until,
                entered_at=status.tripped_at,
                panic_count=status.trip_failure_count,
                window_sec=self.window_sec,
                threshold=self.panic_threshold,
            )

        if until is None or self._read_state().get("cooldown_until") == until:
            return
        storage.update_json(self.state_path, apply, dict, expect=dict, validate=_valid_state)
        log.warning(
            "circuit breaker tripped: %d GPU failure(s) within %.0fs; MLX work refused for %.0fs",
            status.trip_failure_count, self.window_sec, status.cooldown_remaining_sec,
        )
        _crumb("BREAKER_TRIP", "", failures=status.trip_failure_count,
               cooldown_until=round(until, 3))

    # ------------------------------------------------------------------ API

    def ingest(self, *, report_dir: Path | None = None, now: float | None = None) -> int:
        """Archive new reports from the diagnostic-report directories; never raises."""
        since = self._now(now) - (self.window_sec + self.cooldown_sec)
        self.last_scan_errors = []
        try:
            return ingest_panics_jsonl(report_dir=report_dir, jsonl_path=self.jsonl_path, since_ts=since,
                                       scan_errors=self.last_scan_errors)
        except Exception as exc:
            log.warning("panic report ingest failed: %s: %s", type(exc).__name__, exc)
            self.last_scan_errors.append(f"panic report ingest failed: {type(exc).__name__}: {exc}")
            return 0

    def status(self, *, now: float | None = None) -> BreakerStatus:
        """The breaker's state (read-only; does not ingest or persist)."""
        ensure_legacy_imported()  # a metal-guard 0.11 open breaker stays open (migrate.py)
        return self._evaluate(self._read_state(), self._now(now))

    def check(self, *, now: float | None = None, ingest: bool | None = None) -> BreakerStatus:
        """Raise :class:`MLXCooldownActive` while the breaker is open; else return the status,
        with ``report_scan_errors`` (why the report scan could not see its whole window)."""
        at = self._now(now)
        ensure_legacy_imported()  # a metal-guard 0.11 open breaker stays open (migrate.py)
        scan_errors: list[str] = []
        if self.auto_ingest if ingest is None else ingest:
            self.ingest(now=at)
            scan_errors = list(self.last_scan_errors)
        status = dataclasses.replace(self._evaluate(self._read_state(), at, repair=True),
                                     report_scan_errors=scan_errors)
        if status.in_cooldown:
            self._persist_trip(status, at)
            raise MLXCooldownActive(
                remaining_sec=status.cooldown_remaining_sec,
                cooldown_until=status.cooldown_until,
                panic_count=status.trip_failure_count,
                window_sec=self.window_sec,
                message=(
                    f"MLX circuit breaker open after {status.trip_failure_count} GPU failure(s) "
                    f"within {self.window_sec:.0f}s: {status.cooldown_remaining_sec:.0f}s remaining "
                    "(metal-guard breaker clear overrides)"
                ),
            )
        return status

    def record_failure(
        self, kind: str, detail: str = "", *, pid: int | None = None, now: float | None = None
    ) -> BreakerStatus:
        """Count one GPU failure observed by this process (e.g. a worker crash); return the status.

        Record only failures that point at the GPU (a Metal abort, a GPU hang, a worker killed by
        a signal during MLX work) — an ordinary Python exception is not a breaker event.
        """
        if not isinstance(kind, str) or not kind.strip():
            raise ValueError("kind must be a non-empty string")
        at = self._now(now)
        entry: dict[str, Any] = {"ts": at, "kind": kind.strip()[:100], "detail": str(detail)[:DETAIL_MAX_CHARS]}
        if isinstance(pid, int) and not isinstance(pid, bool):
            entry["pid"] = pid
        keep_after = at - (self.window_sec + self.cooldown_sec)

        def apply(state: dict[str, Any]) -> None:
            failures = [f for f in state.get("failures", []) if f["ts"] > keep_after]
            failures.append(entry)
            state["failures"] = failures[-MAX_FAILURES_KEPT:]

        state = storage.update_json(self.state_path, apply, dict, expect=dict, validate=_valid_state)
        _crumb("BREAKER_FAILURE", entry["kind"], pid=pid)
        status = self._evaluate(state, at)
        if status.in_cooldown:
            self._persist_trip(status, at)
        return status

    def clear(self, *, now: float | None = None) -> None:
        """Operator override: close the breaker; failures up to now no longer count."""
        at = self._now(now)

        def apply(state: dict[str, Any]) -> None:
            state.update(cooldown_until=None, entered_at=None, panic_count=0, cleared_at=at)

        storage.update_json(self.state_path, apply, dict, expect=dict, validate=_valid_state)
        log.info("circuit breaker cleared")
        _crumb("BREAKER_CLEAR", "")

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(window_sec={self.window_sec:g}, panic_threshold={self.panic_threshold}, "
            f"cooldown_sec={self.cooldown_sec:g}, state_path={str(self.state_path)!r})"
        )
