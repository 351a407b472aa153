"""Text-level parsers for macOS diagnostic reports (no I/O, never raise).

:func:`parse_report_text` recognises a kernel panic (``bug_type`` 210 JSON or legacy plain
text), a process crash (``bug_type`` 309 JSON or the pasted text form), or a GPU restart event
(``bug_type`` 284), and returns a :class:`ParsedReport` whose ``text`` is what the classifier
should look at. Truncated JSON is salvaged field by field; anything else gives ``None``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from metal_guard.forensics.records import KERNEL_PANIC

log = logging.getLogger("metal_guard.forensics.formats")

__all__ = ["GPU_EVENT", "ParsedReport", "parse_apple_date", "parse_report_text"]

GPU_EVENT = "gpu_event"
#: Characters of panic / crash text kept for the classifier and the excerpt.
MAX_TEXT_CHARS = 256 * 1024
#: Epoch range accepted from report contents (2001-09 .. 2100-01).
_TS_MIN, _TS_MAX = 1_000_000_000.0, 4_102_444_800.0

_DATE_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(Z|[+-]\d{2}:?\d{2})?"
)
_CTIME_RE = re.compile(
    r"^\s*(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r" +\d{1,2} \d{2}:\d{2}:\d{2} \d{4}\s*$",
    re.MULTILINE,
)
_CALENDAR_RE = re.compile(r"Calendar\s*:\s*0x([0-9a-fA-F]{1,16})\s+0x([0-9a-fA-F]{1,16})")
_PANICKED_TASK_RE = re.compile(r"Panicked task 0x[0-9a-fA-F]+:[^\n]*?pid (\d{1,9}): ([^\n]{1,120})")
_PID_RE = re.compile(r"\bpid\s+(\d{1,9}):\s*(\S[^\n]{0,119})")
_IOGPU_FAMILY_RE = re.compile(r"com\.apple\.iokit\.IOGPUFamily(?:\(|\s+)(\d+(?:\.\d+)*)")
_STRING_KEY_RE = r'"{key}"\s*:\s*"'
_LEGACY_PANIC_RE = re.compile(r"panic\(cpu \d+ caller|\*\*\* Panic Report \*\*\*")
_CRASH_TEXT_RE = re.compile(r"^Exception Type:\s", re.MULTILINE)


@dataclass(frozen=True)
class ParsedReport:
    """What a report says, before classification."""

    kind: str
    text: str
    summary: str = ""
    excerpt: str = ""
    timestamp: float | None = None
    timestamp_source: str = "header"
    bug_type: str | None = None
    incident_id: str | None = None
    pid: int | None = None
    process: str | None = None
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- small helpers


def parse_apple_date(value: object) -> float | None:
    """``"2026-03-30 15:06:50.00 -0700"`` (and ISO variants) -> UTC epoch; naive = local."""
    if not isinstance(value, str):
        return None
    match = _DATE_RE.search(value[:200])
    if not match:
        return None
    y, mo, d, h, mi, s, frac, tz = match.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s),
                      int((frac or "0")[:6].ljust(6, "0")))
        if tz:
            if tz == "Z":
                dt = dt.replace(tzinfo=UTC)
            else:
                dt = datetime.fromisoformat(dt.isoformat() + tz[:3] + ":" + tz[-2:])
        ts = dt.timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return ts if _TS_MIN <= ts <= _TS_MAX else None


def _ctime_date(text: str) -> float | None:
    match = _CTIME_RE.search(text[:20000])
    if not match:
        return None
    try:
        ts = datetime.strptime(" ".join(match.group(0).split()), "%a %b %d %H:%M:%S %Y").timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return ts if _TS_MIN <= ts <= _TS_MAX else None


def _calendar_date(text: str) -> float | None:
    match = _CALENDAR_RE.search(text)
    if not match:
        return None
    ts = int(match.group(1), 16) + int(match.group(2), 16) / 1e6
    return ts if _TS_MIN <= ts <= _TS_MAX else None


def _json_obj(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except Exception:  # ValueError, RecursionError on hostile nesting
        return None
    return obj if isinstance(obj, dict) else None


_STRING_BODY_RE = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*')


def _lenient_string(text: str, start: int) -> tuple[str, bool]:
    """Decode the JSON string literal starting at ``start`` (after the quote).

    Returns ``(value, complete)``; a literal cut off by truncation is decoded as far as it goes.
    """
    match = _STRING_BODY_RE.match(text, start)
    raw = match.group(0) if match else ""
    complete = start + len(raw) < len(text) and text[start + len(raw)] == '"'
    for candidate in (raw, re.sub(r"\\(?:u[0-9a-fA-F]{0,3})?$", "", raw)):
        try:
            value = json.loads('"' + candidate + '"')
            if isinstance(value, str):
                return value, complete
        except Exception:
            continue
    return raw.replace("\\n", "\n").replace('\\"', '"').replace("\\/", "/"), complete


def _salvage_string(text: str, key: str) -> tuple[str | None, bool]:
    match = re.search(_STRING_KEY_RE.format(key=re.escape(key)), text)
    if not match:
        return None, False
    return _lenient_string(text, match.end())


def _str(value: object, limit: int = 300) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()[:limit]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 2**31 else None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) < 10:
        return int(value.strip())
    return None


def _d(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _l(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _split_header(text: str) -> tuple[dict[str, Any] | None, str]:
    head, _, rest = text.partition("\n")
    if head.lstrip().startswith("{"):
        header = _json_obj(head)
        if header is not None:
            return header, rest
    if head.strip() == "{":  # a whole-file JSON object
        whole = _json_obj(text)
        if whole is not None:
            return whole, json.dumps(whole)
    return None, text


# --------------------------------------------------------------------------- kernel panics


def _panic_details(panic_text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    line = next((ln for ln in panic_text.splitlines() if "panic(" in ln), "")
    if line:
        out["panic_line"] = line.strip()[:500]
    fam = _IOGPU_FAMILY_RE.search(panic_text)
    if fam:
        out["iogpu_family_version"] = fam.group(1)
    return out


def _panic_pid(panic_text: str) -> tuple[int | None, str | None]:
    match = _PANICKED_TASK_RE.search(panic_text) or _PID_RE.search(panic_text)
    if not match:
        return None, None
    return _int(match.group(1)), match.group(2).strip()[:120] or None


def _panic_report(
    panic_text: str, *, ts: float | None, source: str, bug_type: str | None,
    incident: str | None, truncated: bool, extra: dict[str, Any],
) -> ParsedReport:
    panic_text = panic_text[:MAX_TEXT_CHARS]
    if ts is None:
        ts, source = _calendar_date(panic_text), "calendar"
    pid, process = _panic_pid(panic_text)
    details = _panic_details(panic_text)
    extra = {**extra, **details}
    summary = details.get("panic_line") or (panic_text.strip().splitlines() or ["kernel panic"])[0]
    return ParsedReport(
        kind=KERNEL_PANIC, text=panic_text, summary=summary[:300],
        excerpt="\n".join(panic_text.strip().splitlines()[:40])[:2000],
        timestamp=ts, timestamp_source=source if ts is not None else "none",
        bug_type=bug_type, incident_id=incident, pid=pid, process=process,
        truncated=truncated, extra=extra,
    )


def _parse_panic_json(header: dict[str, Any], body_text: str) -> ParsedReport:
    body = _json_obj(body_text)
    truncated = body is None
    parts: list[str] = []
    if body is not None:
        for key in ("macOSPanicString", "panicString"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                parts.append(value)
    else:
        for key in ("macOSPanicString", "panicString"):
            value, _complete = _salvage_string(body_text, key)
            if value and value.strip():
                parts.append(value)
    ts = parse_apple_date(header.get("timestamp"))
    source = "header"
    if ts is None and body is not None:
        ts, source = parse_apple_date(body.get("date")), "body"
    if ts is None and body is None:
        date, _ = _salvage_string(body_text, "date")
        ts, source = parse_apple_date(date), "body"
    extra: dict[str, Any] = {}
    for key, value in (("os_version", header.get("os_version")),
                       ("product", (body or {}).get("product")),
                       ("build", (body or {}).get("build"))):
        text = _str(value, 120)
        if text:
            extra[key] = text
    incident = _str(header.get("incident_id"), 80) or _str((body or {}).get("incident"), 80)
    return _panic_report(
        "\n".join(parts), ts=ts, source=source, bug_type=_str(header.get("bug_type"), 10),
        incident=incident, truncated=truncated, extra=extra,
    )


def _parse_legacy_panic(text: str) -> ParsedReport:
    start = text.find("panic(")
    panic_text = text[start:] if start >= 0 else text
    ts, source = None, "body"
    match = re.search(r"^Date/Time:\s*(.+)$", text[:20000], re.MULTILINE)
    if match:
        ts = parse_apple_date(match.group(1))
    if ts is None:
        ts = _ctime_date(text)
    return _panic_report(panic_text, ts=ts, source=source, bug_type=None, incident=None,
                         truncated=False, extra={"format": "legacy_text"})


# --------------------------------------------------------------------------- dispatch


def parse_report_text(text: str, *, name: str = "") -> ParsedReport | None:
    """Recognise and parse one report's text; ``None`` when it is not a report. Never raises."""
    try:
        return _parse(text, name)
    except Exception:
        log.debug("report parser failed on %s", name or "<text>", exc_info=True)
        return None


def _parse(text: str, name: str) -> ParsedReport | None:
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.lstrip("\ufeff")
    header, body = _split_header(text)
    if header is not None:
        bug_type = str(header.get("bug_type", "")).strip()
        if bug_type == "210" or (not bug_type and ("panicString" in header
                                                   or "macOSPanicString" in header)):
            return _parse_panic_json(header, body)
        if bug_type in ("309", "109"):
            from metal_guard.forensics.crashformats import parse_crash_json

            return parse_crash_json(header, body)
        if bug_type == "284":
            from metal_guard.forensics.crashformats import parse_gpu_event

            return parse_gpu_event(header, body)
        log.debug("ignoring %s: bug_type %r is not tracked", name or "report", bug_type)
        return None
    if _CRASH_TEXT_RE.search(text[:20000]):
        from metal_guard.forensics.crashformats import parse_crash_text

        return parse_crash_text(text)
    if _LEGACY_PANIC_RE.search(text[:MAX_TEXT_CHARS]):
        return _parse_legacy_panic(text)
    return None
