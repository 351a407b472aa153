"""Process-crash report parsers (``.ips`` ``bug_type`` 309 / 284 and the pasted text form).

Split from :mod:`metal_guard.forensics.formats`, which dispatches here. No I/O; callers catch
everything (see :func:`metal_guard.forensics.formats.parse_report_text`).
"""

from __future__ import annotations

import re
from typing import Any

from metal_guard.forensics.formats import (
    GPU_EVENT,
    MAX_TEXT_CHARS,
    ParsedReport,
    _d,
    _int,
    _json_obj,
    _l,
    _str,
    parse_apple_date,
)
from metal_guard.forensics.records import PROCESS_CRASH

__all__ = ["parse_crash_json", "parse_crash_text", "parse_gpu_event"]

_LIBCXXABI_RE = re.compile(r"libc\+\+abi:?\s*terminating[^\"\n]{0,600}")


def _crash_fields(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    exc = _d(body.get("exception"))
    out["exception_type"] = _str(exc.get("type"), 60)
    out["signal"] = _str(exc.get("signal"), 30)
    term = _d(body.get("termination"))
    out["termination"] = _str(term.get("indicator"), 200)
    messages: list[str] = []
    asi = body.get("asi")
    if isinstance(asi, dict):
        for lines in list(asi.values())[:20]:
            if isinstance(lines, list):
                messages.extend(m.strip()[:600] for m in lines[:20] if isinstance(m, str))
    out["asi"] = messages
    threads = _l(body.get("threads"))
    idx = body.get("faultingThread")
    thread: dict[str, Any] | None = None
    if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(threads):
        thread = threads[idx] if isinstance(threads[idx], dict) else None
    if thread is None:
        thread = next((t for t in threads[:512] if isinstance(t, dict) and t.get("triggered")), None)
    images = _l(body.get("usedImages"))
    frames: list[str] = []
    if thread is not None:
        out["queue"] = _str(thread.get("queue"), 120)
        out["thread_index"] = idx if isinstance(idx, int) and not isinstance(idx, bool) else None
        raw_frames = thread.get("frames")
        for frame in raw_frames[:40] if isinstance(raw_frames, list) else []:
            if not isinstance(frame, dict):
                continue
            image = ""
            ii = frame.get("imageIndex")
            if isinstance(ii, int) and not isinstance(ii, bool) and 0 <= ii < len(images):
                img = images[ii]
                if isinstance(img, dict):
                    image = _str(img.get("name"), 80) or ""
            frames.append(f"{image} {_str(frame.get('symbol'), 200) or '???'}".strip())
    if not out.get("queue"):
        legacy = body.get("legacyInfo")
        trig = legacy.get("threadTriggered") if isinstance(legacy, dict) else None
        out["queue"] = _str(trig.get("queue"), 120) if isinstance(trig, dict) else None
    out["frames"] = frames
    out["process"] = _str(body.get("procName"), 120)
    out["pid"] = _int(body.get("pid"))
    out["model_code"] = _str(body.get("modelCode"), 40)
    return out


def _crash_fields_salvaged(body_text: str) -> dict[str, Any]:
    def grab(pattern: str, limit: int = 200) -> str | None:
        match = re.search(pattern, body_text)
        return match.group(1)[:limit] if match else None

    queue = grab(r'"triggered"\s*:\s*true\s*,[^{}\[\]]{0,300}?"queue"\s*:\s*"([^"]{1,120})"')
    queue = queue or grab(r'"threadTriggered"\s*:\s*\{\s*"queue"\s*:\s*"([^"]{1,120})"')
    pid = grab(r'"pid"\s*:\s*(\d{1,9})')
    return {
        "exception_type": grab(r'"type"\s*:\s*"(EXC_[A-Z_]{1,40})"'),
        "signal": grab(r'"signal"\s*:\s*"(SIG[A-Z0-9]{1,20})"'),
        "termination": grab(r'"indicator"\s*:\s*"([^"]{1,200})"'),
        "asi": re.findall(r'"(abort\(\) called|[^"]{0,200}terminating due to[^"]{0,400})"', body_text)[:10],
        "queue": queue, "frames": [], "process": grab(r'"procName"\s*:\s*"([^"]{1,120})"'),
        "pid": int(pid) if pid else None, "model_code": grab(r'"modelCode"\s*:\s*"([^"]{1,40})"'),
    }


def _crash_text(f: dict[str, Any], abort_msg: str | None) -> str:
    lines = [f"Process: {f.get('process') or '?'} [{f.get('pid') or '?'}]"]
    if f.get("exception_type") or f.get("signal"):
        lines.append(f"Exception Type: {f.get('exception_type') or '?'} ({f.get('signal') or '?'})")
    if f.get("termination"):
        lines.append(f"Termination Reason: {f['termination']}")
    if f.get("asi") or abort_msg:
        lines.append("Application Specific Information:")
        lines.extend(f["asi"] or [])
        if abort_msg and abort_msg not in (f.get("asi") or []):
            lines.append(abort_msg)
    thread = f.get("thread_index")
    lines.append(f"Thread {thread if thread is not None else '?'} Crashed:: Dispatch queue: "
                 f"{f.get('queue') or '(none)'}")
    lines.extend(f"{i:<3} {fr}" for i, fr in enumerate(f.get("frames") or []))
    return "\n".join(lines)


def parse_crash_json(header: dict[str, Any], body_text: str) -> ParsedReport:
    body = _json_obj(body_text)
    f = _crash_fields(body) if body is not None else _crash_fields_salvaged(body_text[:MAX_TEXT_CHARS])
    abort = _LIBCXXABI_RE.search(body_text[:MAX_TEXT_CHARS])
    abort_msg = abort.group(0).strip() if abort else None
    text = _crash_text(f, abort_msg)
    if body is None:  # let the classifier see the raw JSON patterns too
        text += "\n" + body_text[:MAX_TEXT_CHARS]
    ts = parse_apple_date(header.get("timestamp"))
    source = "header"
    if ts is None and body is not None:
        ts, source = parse_apple_date(body.get("captureTime")), "body"
    process = f.get("process") or _str(header.get("app_name"), 120) or _str(header.get("name"), 120)
    summary = f"{f.get('exception_type') or 'crash'} ({f.get('signal') or '?'}) in {process or '?'}"
    if f.get("queue"):
        summary += f" on {f['queue']}"
    extra = {k: f[k] for k in ("exception_type", "signal", "termination", "queue", "model_code")
             if f.get(k)}
    if abort_msg:
        extra["abort_message"] = abort_msg[:600]
    if _str(header.get("os_version"), 120):
        extra["os_version"] = _str(header.get("os_version"), 120)
    return ParsedReport(
        kind=PROCESS_CRASH, text=text, summary=summary[:300], excerpt=text[:2000], timestamp=ts,
        timestamp_source=source if ts is not None else "none",
        bug_type=_str(header.get("bug_type"), 10),
        incident_id=_str(header.get("incident_id"), 80), pid=f.get("pid"), process=process,
        truncated=body is None, extra=extra,
    )


def parse_crash_text(text: str) -> ParsedReport:
    text = text[:MAX_TEXT_CHARS]

    def field_(name: str) -> str | None:
        match = re.search(rf"^{name}:\s*(.+)$", text, re.MULTILINE)
        return match.group(1).strip()[:300] if match else None

    proc = field_("Process")
    pid = None
    if proc:
        m = re.match(r"(.+?)\s*\[(\d{1,9})\]", proc)
        if m:
            proc, pid = m.group(1), int(m.group(2))
    exc = field_("Exception Type")
    queue = re.search(r"Crashed:*\s+Dispatch queue:\s*(\S+)", text)
    ts = parse_apple_date(field_("Date/Time"))
    extra: dict[str, Any] = {"format": "crash_text"}
    if exc:
        extra["exception_type"] = exc
    if queue:
        extra["queue"] = queue.group(1)
    if field_("OS Version"):
        extra["os_version"] = field_("OS Version")
    summary = f"{exc or 'crash'} in {proc or '?'}" + (f" on {queue.group(1)}" if queue else "")
    return ParsedReport(
        kind=PROCESS_CRASH, text=text, summary=summary[:300], excerpt=text[:2000], timestamp=ts,
        timestamp_source="body" if ts is not None else "none", pid=pid, process=proc, extra=extra,
    )


def parse_gpu_event(header: dict[str, Any], body_text: str) -> ParsedReport:
    body = _json_obj(body_text) or {}
    analysis = _d(body.get("analysis"))
    desc = _str(analysis.get("restart_reason_desc"), 200) or "GPU restart"
    process = _str(header.get("app_name"), 120) or _str(header.get("name"), 120)
    text = f"GPU restart ({desc}) for {process or '?'}"
    return ParsedReport(
        kind=GPU_EVENT, text=text, summary=text, excerpt=text,
        timestamp=parse_apple_date(header.get("timestamp")),
        bug_type=_str(header.get("bug_type"), 10), incident_id=_str(header.get("incident_id"), 80),
        process=process, truncated=not body, extra={"restart_reason": desc},
    )
