"""Take over the safety state of a metal-guard 0.11 installation, once, on first use.

metal-guard 0.11 (the single-module reference) kept its state in ``~/.cache/metal-guard/``
and its lockout ack in ``~/.metal-guard-ack``. A user who upgrades in the middle of a cooldown
must stay in that cooldown: :func:`ensure_imported` reads the old files and carries over what
still matters into our own state, through our own writers:

=========================  =========================================================  ==========================
0.11 file                  what is carried over                                       into
=========================  =========================================================  ==========================
``panic-sentinel.json``    ``cooldown_until`` (naive *local* ISO text) still ahead     ``mark_panic_sentinel_cooldown``
``breaker.json``           ``cooldown_until`` (epoch) still ahead: the breaker stays   ``<state>/breaker.json``
                           open until then
``cadence.json``           ``{model_id: epoch}`` loads of the last 4 h                 ``<state>/cadence.json``
``panics.jsonl``           panic records of the last 7 days not already archived      ``<state>/panics.jsonl``
``~/.metal-guard-ack``     an ack touched within the last 24 h (its mtime)            ``<state>/panic-ack.json``
=========================  =========================================================  ==========================

Rules: a cooldown is never shortened (the later of ours and theirs wins) and is capped at
:data:`MAX_COOLDOWN_SEC` from now; the old files are only read, never written, moved or
deleted; every read is bounded, refuses symlinks, other users' files and non-regular files,
and a file that cannot be understood is skipped with a warning (it never breaks the gate).

Once something was found, a marker ``<state>/legacy-import.json`` records what was taken over
(and a ``LEGACY_IMPORT`` breadcrumb says so); later calls cost one ``stat`` of that marker.
When no 0.11 file exists nothing is written, and the check costs three ``stat`` calls.

The old location is ``METALGUARD_LEGACY_DIR`` (default ``~/.cache/metal-guard``). The ack is
``~/.metal-guard-ack``, or ``.metal-guard-ack`` inside ``METALGUARD_LEGACY_DIR`` when that is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from metal_guard import storage
from metal_guard.settings import Settings, settings_or_current

log = logging.getLogger("metal_guard.migrate")

__all__ = ["MARKER_FILE", "ensure_imported", "import_legacy_state", "legacy_paths"]

MARKER_FILE = "legacy-import.json"
LEGACY_DIR_DEFAULT = "~/.cache/metal-guard"
LEGACY_ACK_NAME = ".metal-guard-ack"
SENTINEL = "panic-sentinel.json"
BREAKER = "breaker.json"
CADENCE = "cadence.json"
PANICS = "panics.jsonl"

#: A carried-over cooldown ends at most this long after the import (a garbage date such as
#: year 9999 must not lock the machine forever; a real 0.11 cooldown is hours long).
MAX_COOLDOWN_SEC = 7 * 24 * 3600.0
#: The 0.11 ack cleared a lockout for 24 h after it was touched.
ACK_VALID_SEC = 24 * 3600.0
#: Cadence entries older than this no longer matter (0.11 itself dropped them after 4 h).
CADENCE_HORIZON_SEC = 4 * 3600.0
#: Panic records older than this are history, not state.
PANIC_HORIZON_SEC = 7 * 24 * 3600.0
#: Times this far ahead of the clock are accepted as clock skew (and clamped to now).
FUTURE_SKEW_SEC = 60.0
#: Two records of the same pid this close together are the same panic.
PANIC_DEDUP_SEC = 600.0

MAX_JSON_BYTES = 1 << 20
MAX_JSONL_TAIL_BYTES = 2 << 20
MAX_CADENCE_ENTRIES = 256
MAX_PANIC_RECORDS = 1000
MAX_MODEL_ID_CHARS = 512
MAX_TEXT_CHARS = 500
MAX_PATH_CHARS = 1024

_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class _Skip(Exception):
    """A 0.11 file that is present but not usable (the message says why)."""


# --------------------------------------------------------------------------- paths


def legacy_paths(settings: Settings | None = None) -> tuple[Path, Path]:
    """``(legacy state directory, legacy ack file)`` for these settings."""
    s = settings_or_current(settings)
    configured = s.legacy_dir
    if configured is not None:
        return configured, configured / LEGACY_ACK_NAME
    return Path(LEGACY_DIR_DEFAULT).expanduser(), Path.home() / LEGACY_ACK_NAME


# --------------------------------------------------------------------------- hostile reads


def _open_regular(path: Path) -> int | None:
    """An fd on ``path`` if it is our user's regular file; ``None`` if it does not exist."""
    try:
        opened = storage.open_regular(path, owner=os.getuid() if hasattr(os, "getuid") else None)
    except storage.NotAStateFile as exc:
        raise _Skip(f"{exc} (not followed)" if "symbolic link" in str(exc) else str(exc)) from None
    except OSError as exc:
        raise _Skip(f"cannot be opened: {exc.strerror or exc}") from None
    return None if opened is None else opened[0]


def _read_bounded(path: Path, max_bytes: int, *, tail: bool = False) -> bytes | None:
    """The file's bytes (at most ``max_bytes``; the last ones with ``tail``), or ``None``."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes and not tail:
            raise _Skip(f"is larger than {max_bytes} bytes")
        data = storage.read_fd(fd, max_bytes, offset=max(0, size - max_bytes))
        if tail and size > max_bytes:
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""  # drop the partial line
        return data
    finally:
        os.close(fd)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    raw = _read_bounded(path, MAX_JSON_BYTES)
    if raw is None:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Skip(f"is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _Skip(f"holds a JSON {type(obj).__name__}, not an object")
    return obj


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any, limit: int) -> str:
    """``value`` as one line of printable text, at most ``limit`` characters."""
    if not isinstance(value, str):
        return ""
    return "".join(ch if ch.isprintable() else " " for ch in value[:limit]).strip()


def _local_iso_to_epoch(text: str) -> float:
    """0.11 wrote ``datetime.now().isoformat()``: naive means *local* time."""
    if len(text) > 64:
        raise ValueError("timestamp text too long")
    parsed = datetime.fromisoformat(text.strip())
    return parsed.timestamp()  # naive -> local time, aware -> its own offset


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# --------------------------------------------------------------------------- one file each


def _take_sentinel(s: Settings, legacy: Path, now: float) -> dict[str, Any] | None:
    data = _read_json_object(legacy / SENTINEL)
    if data is None:
        return None
    raw = data.get("cooldown_until")
    try:
        until = _local_iso_to_epoch(raw) if isinstance(raw, str) else _number(raw)
    except (ValueError, OverflowError, OSError) as exc:
        raise _Skip(f"has an unreadable cooldown_until {str(raw)[:80]!r} ({exc})") from None
    if until is None:
        raise _Skip("has no cooldown_until")
    if until <= now:
        return {"cooldown_until": _iso(until), "taken": False, "why": "expired"}
    capped = min(until, now + MAX_COOLDOWN_SEC)
    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

    mark_panic_sentinel_cooldown((capped - now) / 3600.0, now=now, settings=s,
                                 reason=f"carried over from metal-guard 0.11 ({legacy / SENTINEL})")
    out = {"cooldown_until": _iso(capped), "taken": True}
    if capped < until:
        out["capped_from"] = _iso(until)
    return out


def _take_breaker(s: Settings, legacy: Path, now: float) -> dict[str, Any] | None:
    data = _read_json_object(legacy / BREAKER)
    if data is None:
        return None
    until = _number(data.get("cooldown_until"))
    if until is None:
        return {"taken": False, "why": "closed"}
    if until <= now:
        return {"cooldown_until": _iso(until), "taken": False, "why": "expired"}
    capped = min(until, now + MAX_COOLDOWN_SEC)
    entered = _number(data.get("entered_at"))
    entered = min(entered, now) if entered is not None else now
    count = _number(data.get("panic_count"))
    window = _number(data.get("window_sec"))
    threshold = _number(data.get("threshold"))

    from metal_guard import breaker

    def apply(state: dict[str, Any]) -> None:
        current = _number(state.get("cooldown_until"))
        if current is not None and current >= capped:
            return
        state.update(cooldown_until=capped, entered_at=entered,
                     panic_count=int(count) if count is not None and 0 <= count < 1e6 else 0)
        if window is not None and window > 0:
            state["window_sec"] = window
        if threshold is not None and 1 <= threshold < 1e6:
            state["threshold"] = int(threshold)

    storage.update_json(s.state_file(breaker.BREAKER_FILE), apply, dict, expect=dict,
                        validate=getattr(breaker, "_valid_state", None))
    return {"cooldown_until": _iso(capped), "taken": True}


def _take_cadence(s: Settings, legacy: Path, now: float) -> dict[str, Any] | None:
    data = _read_json_object(legacy / CADENCE)
    if data is None:
        return None
    entries: dict[str, float] = {}
    dropped = 0
    for key, value in data.items():
        ts = _number(value)
        model = key.strip() if isinstance(key, str) else ""
        if (ts is None or not model or len(model) > MAX_MODEL_ID_CHARS
                or not model.isprintable()):
            dropped += 1
            continue
        if ts <= now - CADENCE_HORIZON_SEC or ts > now + FUTURE_SKEW_SEC:
            continue  # too old to matter, or a date in the future (not a real load)
        entries[model] = min(ts, now)
    newest = dict(sorted(entries.items(), key=lambda kv: kv[1], reverse=True)[:MAX_CADENCE_ENTRIES])
    if newest:
        from metal_guard import cadence

        def apply(state: dict[str, Any]) -> None:
            for model, ts in newest.items():
                current = cadence.record_of(state.get(model))
                if current is None or current["ts"] < ts:
                    state[model] = {"ts": ts, "cmd": "metal-guard 0.11",
                                    "interval_source": "imported from metal-guard 0.11"}

        storage.update_json(s.state_file(cadence.CADENCE_FILE), apply, dict, expect=dict,
                            validate=getattr(cadence, "_valid_state", None))
    out: dict[str, Any] = {"taken": len(newest), "models": sorted(newest)[:20]}
    if dropped:
        out["invalid_entries"] = dropped
    return out


def _legacy_panic(line: bytes, now: float) -> dict[str, Any] | None:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    ts = _number(rec.get("ts"))
    if ts is None or ts <= now - PANIC_HORIZON_SEC or ts > now + FUTURE_SKEW_SEC:
        return None
    signature = rec.get("signature")
    pid = rec.get("pid")
    source = _text(rec.get("source_file"), MAX_PATH_CHARS)
    return {
        "ts": min(ts, now),
        "signature": signature if isinstance(signature, str) and _SIGNATURE_RE.match(signature)
        else "unknown",
        "explanation": _text(rec.get("explanation"), MAX_TEXT_CHARS),
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31 else None,
        "source_file": source,
        "timestamp_source": "metal-guard 0.11 archive",
        "report_id": f"mg011:{source or '?'}@{int(ts)}:{pid if isinstance(pid, int) else '-'}",
    }


def _same_panic(rec: dict[str, Any], ours: Any) -> bool:
    """Is the 0.11 record ``rec`` a report we archived ourselves already?"""
    if rec["source_file"] and ours.path and Path(rec["source_file"]).name == Path(ours.path).name:
        return True
    return (rec["pid"] is not None and ours.pid == rec["pid"]
            and abs(ours.timestamp - rec["ts"]) <= PANIC_DEDUP_SEC)


def _take_panics(s: Settings, legacy: Path, now: float) -> dict[str, Any] | None:
    raw = _read_bounded(legacy / PANICS, MAX_JSONL_TAIL_BYTES, tail=True)
    if raw is None:
        return None
    records = [r for r in (_legacy_panic(line, now) for line in raw.splitlines() if line.strip())
               if r is not None][-MAX_PANIC_RECORDS:]
    if not records:
        return {"taken": 0}
    from metal_guard import breaker

    archive = s.state_file(breaker.PANICS_FILE)
    # Archive what the diagnostic reports still show first, so a panic both versions saw
    # (0.11 timed it from the panic string, we from the report header) is counted once.
    breaker.ingest_panics_jsonl(jsonl_path=archive, since_ts=now - PANIC_HORIZON_SEC)
    ours = breaker.read_panic_archive(archive)
    fresh = [r for r in records if not any(_same_panic(r, o) for o in ours)]
    added = breaker.ingest_panics_jsonl(jsonl_path=archive, records=fresh) if fresh else 0
    return {"taken": added, "already_known": len(records) - len(fresh)}


def _take_ack(s: Settings, ack: Path, now: float) -> dict[str, Any] | None:
    fd = _open_regular(ack)  # only the mtime matters, as in 0.11
    if fd is None:
        return None
    try:
        mtime = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    if mtime > now + FUTURE_SKEW_SEC:
        raise _Skip(f"has a modification time in the future ({_iso(mtime)})")
    acked_at = min(mtime, now)
    if now - acked_at >= ACK_VALID_SEC:
        return {"acked_at": _iso(acked_at), "taken": False, "why": "older than 24 h"}
    from metal_guard.forensics import gate

    current = _number((gate.read_panic_ack(settings=s) or {}).get("acked_at_ts"))
    if current is not None and current >= acked_at:
        return {"acked_at": _iso(acked_at), "taken": False, "why": "a newer ack exists"}
    gate.ack_panic_lockout(now=acked_at, settings=s,
                           note=f"carried over from metal-guard 0.11 ({ack})")
    return {"acked_at": _iso(acked_at), "taken": True}


# --------------------------------------------------------------------------- entry points


def _anything_there(legacy: Path, ack: Path) -> bool:
    return os.path.lexists(legacy) or os.path.lexists(ack)


def import_legacy_state(
    settings: Settings | None = None, *, now: float | None = None, force: bool = False,
) -> dict[str, Any] | None:
    """Carry the 0.11 state over now; return what was done (``None`` when nothing to do).

    Without ``force`` it does nothing once the marker exists. Failures of one file are
    reported in ``warnings`` and do not stop the others. May raise on our own I/O failures
    (use :func:`ensure_imported`, which never raises).
    """
    s = settings_or_current(settings)
    at = time.time() if now is None else float(now)
    legacy, ack = legacy_paths(s)
    marker = s.state_file(MARKER_FILE)
    if not _anything_there(legacy, ack):
        return None
    with storage.locked(marker):
        if os.path.lexists(marker) and not force:
            return None
        summary: dict[str, Any] = {"imported_at": _iso(at), "imported_at_ts": at,
                                   "legacy_dir": str(legacy), "ack_path": str(ack)}
        warnings: list[str] = []
        if os.path.islink(legacy):
            warnings.append(f"{legacy} is a symbolic link; its files were not read")
        elif os.path.lexists(legacy) and not os.path.isdir(legacy):
            warnings.append(f"{legacy} is not a directory; nothing was read from it")
        elif os.path.isdir(legacy):
            for name, take in (("sentinel", _take_sentinel), ("breaker", _take_breaker),
                               ("cadence", _take_cadence), ("panics", _take_panics)):
                summary[name] = _guarded(name, partial(take, s, legacy, at), warnings)
        summary["ack"] = _guarded("ack", partial(_take_ack, s, ack, at), warnings)
        summary["warnings"] = warnings
        try:
            storage.write_json(marker, summary)
        except OSError as exc:
            warnings.append(f"could not write {marker}: {exc} (the import will run again)")
            log.warning("metal-guard 0.11 import: could not write %s: %s", marker, exc)
    _report(summary)
    return summary


def _guarded(name: str, fn: Any, warnings: list[str]) -> Any:
    try:
        return fn()
    except _Skip as exc:
        warnings.append(f"{name}: skipped, the file {exc}")
        return {"taken": False, "why": f"unusable: {exc}"}


def _report(summary: dict[str, Any]) -> None:
    from metal_guard.breadcrumbs import breadcrumb_with_meta

    def taken(key: str) -> Any:
        part = summary.get(key)
        return part.get("taken") if isinstance(part, dict) else None

    meta: dict[str, Any] = {}
    for key in ("sentinel", "breaker"):
        if taken(key) is True:
            meta[f"{key}_until"] = summary[key]["cooldown_until"]
    if taken("ack") is True:
        meta["ack_at"] = summary["ack"]["acked_at"]
    for key in ("cadence", "panics"):
        if taken(key):
            meta[key] = taken(key)
    if summary.get("warnings"):
        meta["warnings"] = len(summary["warnings"])
    what = ", ".join(sorted(meta)) or "nothing still active"
    breadcrumb_with_meta("LEGACY_IMPORT", f"metal-guard 0.11 state from {summary['legacy_dir']}",
                         **meta)
    log.info("metal-guard 0.11 state carried over from %s: %s", summary["legacy_dir"], what)
    for warning in summary.get("warnings", []):
        log.warning("metal-guard 0.11 import: %s", warning)


_busy = threading.local()


def ensure_imported(settings: Settings | None = None, *, now: float | None = None) -> dict[str, Any] | None:
    """Import the 0.11 state if that has not happened yet. Cheap when done; never raises."""
    if getattr(_busy, "active", False):
        return None  # called back from inside the import itself
    try:
        s = settings_or_current(settings)
        if os.path.lexists(s.state_file(MARKER_FILE)):
            return None
        _busy.active = True
        return import_legacy_state(s, now=now)
    except Exception as exc:  # a broken import must never break the gate or a load
        log.warning("metal-guard 0.11 state could not be carried over: %s: %s",
                    type(exc).__name__, exc)
        return None
    finally:
        _busy.active = False
