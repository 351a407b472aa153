"""Breadcrumbs: a small append-only log that survives the crash it describes.

Line format (UTC, ISO 8601)::

    [2026-11-25T19:07:39.123456+00:00] TAG: payload | k=v k=v

Durability policy. A kernel panic erases whatever the kernel had not yet written, so a
breadcrumb is only useful if it reached the disk *before* the crash:

* **rare events** — loads, unloads, cleanups, crashes, worker PRE/POST markers — are written
  with ``fsync`` (``durable=True``, the default of :func:`breadcrumb` and
  :func:`breadcrumb_with_meta`);
* **frequent events** (per-generate bookkeeping) pass ``durable=False``: the line is written
  with one ``write`` on an ``O_APPEND`` descriptor (so it is in the page cache and survives a
  process crash) but not fsync'd, which keeps an fsync off the generate hot path.

The file lives in the state dir (``<state>/metal_breadcrumb.log``, or
``METALGUARD_BREADCRUMB_PATH``), never relative to the working directory. When it grows past
``METALGUARD_BREADCRUMB_MAX_BYTES`` it is rotated to ``.1`` (one backup). Writing a breadcrumb
never raises: a full disk must not turn into an application error (it logs a warning, once per
run of failures).

Every field is escaped with :func:`escape` (one scheme for every character any reader may take
for a line or field break), so a record is exactly one line however the log is split, and
:func:`parse_line` returns the original text. The reader splits on ``\n`` only and skips an
unterminated last line; an append that follows a torn line (a crash, a full disk) is preceded
by :data:`TORN_MARK` so the fragment never parses. Appends go through
:func:`metal_guard.storage.append_bytes` (``O_NOFOLLOW``, whole records or nothing).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("metal_guard.breadcrumbs")

__all__ = [
    "Breadcrumb",
    "breadcrumb",
    "breadcrumb_with_meta",
    "format_line",
    "parse_line",
    "read_lines",
    "tail",
]

_TAG_RE = re.compile(r"[^A-Z0-9_]")
_KEY_RE = re.compile(r"[^A-Za-z0-9_.\-]")
_LINE_RE = re.compile(
    r"^\[(?P<ts>[^\]]+)\] (?P<tag>[A-Z0-9_]+):(?: (?!\| )(?P<payload>.*?))?(?: \| (?P<meta>.*))?$"
)
_META_RE = re.compile(r"(?P<k>[A-Za-z0-9_.\-]+)=(?P<v>\S*)")
_UNESCAPE_RE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")
#: Written before a record that follows a torn (unterminated) line, so that the fragment can
#: be told apart: no line we write contains this character (it is always escaped).
TORN_MARK = "\x18"
_HEAL = (TORN_MARK + "\n").encode()
_write_lock = threading.Lock()
_failing = False


@dataclass(frozen=True)
class Breadcrumb:
    """A parsed breadcrumb line. ``ts`` is timezone-aware (UTC for lines we wrote)."""

    ts: datetime
    tag: str
    payload: str
    meta: dict[str, str] = field(default_factory=dict)
    raw: str = ""


def _hex(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(value: object, *, meta: bool = False) -> str:
    """The escaped form of ``value`` for a breadcrumb line.

    One scheme for every field: ``\\`` becomes ``\\\\``; ``|`` and every character that is
    not printable (all line and paragraph separators, ``\\x0b``, ``\\x0c``, ``\\x1c`` to ``\\x1e``,
    ``\\x85``, tabs and every other whitespace but the plain space, controls, format
    characters, surrogates) become ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN``. In a meta value
    the space and ``"`` are escaped too, so a value is one ``\\S+`` token. A reader that
    splits on any of those characters therefore sees exactly the lines we wrote.
    """
    text = str(value)
    out: list[str] = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "|" or not ch.isprintable() or (meta and ch in ' "'):
            out.append(_hex(ch))
        else:
            out.append(ch)
    if not meta and out:  # keep edge spaces through the reader's strip()
        if out[0] == " ":
            out[0] = "\\x20"
        if out[-1] == " ":
            out[-1] = "\\x20"
    return "".join(out)


def unescape(text: str) -> str:
    """Invert :func:`escape` (a backslash not starting an escape is kept as it is)."""
    def repl(match: re.Match[str]) -> str:
        body = match.group(1)
        return "\\" if body == "\\" else chr(int(body[1:], 16))

    return _UNESCAPE_RE.sub(repl, text)


def _meta_value(value: object) -> str:
    text = escape(value, meta=True)
    return text if text else '""'


def _meta_key(key: object) -> str:
    return _KEY_RE.sub("_", str(key)) or "_"


def format_line(tag: str, payload: str = "", *, now: datetime | None = None, **meta: Any) -> str:
    """Render one breadcrumb line (without the newline); fields are :func:`escape`\\ d."""
    ts = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
    tag = _TAG_RE.sub("_", str(tag).upper()) or "NOTE"
    line = f"[{ts}] {tag}:"
    payload = escape(payload)
    if payload:
        line += f" {payload}"
    if meta:
        line += " | " + " ".join(f"{_meta_key(k)}={_meta_value(meta[k])}" for k in sorted(meta))
    return line


def _rotate_if_needed(path: Path, max_bytes: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size < max_bytes:
        return  # a link or other foreign file is dealt with by the append
    try:
        os.replace(path, path.with_name(path.name + ".1"))
    except OSError as exc:
        log.debug("breadcrumb rotation failed: %s", exc)


def _write(line: str, *, durable: bool, log_path: Path | None) -> bool:
    global _failing
    try:
        from metal_guard.settings import get_settings
        from metal_guard.storage import append_bytes

        settings = get_settings()
        target = Path(log_path) if log_path is not None else settings.resolved_breadcrumb_path
        data = (line + "\n").encode("utf-8", "replace")
        with _write_lock:
            _rotate_if_needed(target, settings.breadcrumb_max_bytes)
            append_bytes(target, data, fsync=durable, heal=_HEAL, settings=settings)
        _failing = False
        return True
    except Exception as exc:  # never let forensics break the workload
        if not _failing:  # loud once per run of failures, then quiet until a write succeeds
            log.warning("breadcrumb not written (forensic log incomplete): %s", exc)
        else:
            log.debug("breadcrumb write failed: %s", exc)
        _failing = True
        return False


def breadcrumb(msg: str, *, durable: bool = True, log_path: Path | None = None) -> bool:
    """Write ``msg`` as a breadcrumb. ``"LOAD: model START"`` keeps its tag ``LOAD``.

    Returns whether the line was written (it never raises).
    """
    text = str(msg)
    match = re.match(r"^([A-Za-z0-9_]+):\s*(.*)$", text, re.DOTALL)
    if match:
        line = format_line(match.group(1), match.group(2))
    else:
        line = format_line("NOTE", text)
    return _write(line, durable=durable, log_path=log_path)


def breadcrumb_with_meta(
    tag: str, payload: str = "", *, durable: bool = True, log_path: Path | None = None, **meta: Any
) -> bool:
    """Write ``[ts] TAG: payload | k=v k=v`` (keys sorted; ``|`` in values becomes ``/``).

    ``durable`` and ``log_path`` are the only reserved names; every other keyword is metadata.
    A rank of a distributed job adds ``rank`` and ``world_size`` (unless given).
    """
    try:
        from metal_guard.distributed import rank_fields

        for key, value in rank_fields().items():
            meta.setdefault(key, value)
    except Exception:  # never let rank detection break a breadcrumb
        pass
    return _write(format_line(tag, payload, **meta), durable=durable, log_path=log_path)


def parse_line(line: str) -> Breadcrumb | None:
    """Parse one line; ``None`` for anything that is not a breadcrumb.

    Accepts lines we write (ISO timestamps) and the seed's legacy local-time form
    ``[YYYY-MM-DD HH:MM:SS]`` (read as local time).
    """
    line = line.rstrip("\n")
    if TORN_MARK in line:
        return None  # a fragment of a record torn by a full disk or a crash
    match = _LINE_RE.match(line)
    if not match:
        return None
    ts_text = match.group("ts")
    try:
        ts = datetime.fromisoformat(ts_text)
        if ts.tzinfo is None:
            ts = ts.astimezone(UTC)  # naive = local time (legacy format)
    except (ValueError, OverflowError, OSError):
        return None
    meta_text = match.group("meta") or ""
    meta = {m.group("k"): "" if m.group("v") == '""' else unescape(m.group("v"))
            for m in _META_RE.finditer(meta_text)}
    payload = (match.group("payload") or "").strip()
    if meta_text and not meta:
        payload = f"{payload} | {meta_text}".strip(" |")
    return Breadcrumb(ts=ts, tag=match.group("tag"), payload=unescape(payload), meta=meta, raw=line)


def read_lines(n: int = 200, *, path: Path | None = None, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``n`` complete raw lines of the log (reading at most ``max_bytes`` of each file).

    Includes the rotated ``.1`` file when the current one is shorter than ``n`` lines. Lines
    are split on ``\n`` only (never on the other characters ``str.splitlines`` treats as
    line breaks), and an unterminated last line (a record being written, or torn) is left
    out. A symlink or non-regular file is skipped with a warning, never followed; a log that
    exists but cannot be read raises :class:`~metal_guard.errors.StateFileError`.
    """
    if n <= 0:
        return []
    from metal_guard.settings import get_settings
    from metal_guard.storage import NotAStateFile, read_bytes_capped

    target = Path(path) if path is not None else get_settings().resolved_breadcrumb_path
    lines: deque[str] = deque(maxlen=n)
    for candidate in (target.with_name(target.name + ".1"), target):
        try:
            got = read_bytes_capped(candidate, max_bytes, tail=True)
        except NotAStateFile as exc:
            log.warning("not reading breadcrumbs from %s: it %s", candidate, exc)
            continue
        if got is None:
            continue
        chunk, truncated = got
        pieces = chunk.split(b"\n")
        if truncated:
            pieces = pieces[1:]  # cut by the tail read
        if pieces:
            pieces.pop()  # b"" after the final newline, else an unterminated record
        lines.extend(raw.decode("utf-8", "replace") for raw in pieces)
    return list(lines)


def tail(n: int = 20, *, path: Path | None = None) -> list[Breadcrumb]:
    """The last ``n`` parseable breadcrumbs, oldest first."""
    parsed = [b for b in (parse_line(line) for line in read_lines(n, path=path)) if b is not None]
    return parsed[-n:]
