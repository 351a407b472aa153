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
never raises: a full disk must not turn into an application error.
"""

from __future__ import annotations

import logging
import os
import re
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
_LINE_RE = re.compile(
    r"^\[(?P<ts>[^\]]+)\] (?P<tag>[A-Z0-9_]+):(?: (?P<payload>.*?))?(?: \| (?P<meta>.*))?$"
)
_META_RE = re.compile(r"(?P<k>[A-Za-z0-9_.\-]+)=(?P<v>\S*)")
_write_lock = threading.Lock()


@dataclass(frozen=True)
class Breadcrumb:
    """A parsed breadcrumb line. ``ts`` is timezone-aware (UTC for lines we wrote)."""

    ts: datetime
    tag: str
    payload: str
    meta: dict[str, str] = field(default_factory=dict)
    raw: str = ""


def _clean(value: object) -> str:
    text = str(value).replace("\n", " ").replace("\r", " ").replace("|", "/")
    return text


def _meta_value(value: object) -> str:
    text = _clean(value).replace(" ", "_")
    return text if text else '""'


def format_line(tag: str, payload: str = "", *, now: datetime | None = None, **meta: Any) -> str:
    """Render one breadcrumb line (without the newline)."""
    ts = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
    tag = _TAG_RE.sub("_", str(tag).upper()) or "NOTE"
    line = f"[{ts}] {tag}:"
    payload = _clean(payload).strip()
    if payload:
        line += f" {payload}"
    if meta:
        line += " | " + " ".join(f"{k}={_meta_value(meta[k])}" for k in sorted(meta))
    return line


def _rotate_if_needed(path: Path, max_bytes: int) -> None:
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    try:
        os.replace(path, path.with_name(path.name + ".1"))
    except OSError as exc:
        log.debug("breadcrumb rotation failed: %s", exc)


def _write(line: str, *, durable: bool, log_path: Path | None) -> bool:
    try:
        from metal_guard.settings import get_settings
        from metal_guard.storage import FILE_MODE, ensure_dir

        settings = get_settings()
        target = Path(log_path) if log_path is not None else settings.resolved_breadcrumb_path
        data = (line + "\n").encode("utf-8", "replace")
        with _write_lock:
            ensure_dir(target.parent)
            _rotate_if_needed(target, settings.breadcrumb_max_bytes)
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        return True
    except Exception as exc:  # never let forensics break the workload
        log.debug("breadcrumb write failed: %s", exc)
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
    match = _LINE_RE.match(line.rstrip("\r\n"))
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
    meta = {m.group("k"): m.group("v") for m in _META_RE.finditer(meta_text)}
    payload = (match.group("payload") or "").strip()
    if meta_text and not meta:
        payload = f"{payload} | {meta_text}".strip(" |")
    return Breadcrumb(ts=ts, tag=match.group("tag"), payload=payload, meta=meta, raw=line.rstrip("\n"))


def read_lines(n: int = 200, *, path: Path | None = None, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``n`` raw lines of the log (reading at most ``max_bytes`` from its end).

    Includes the rotated ``.1`` file when the current one is shorter than ``n`` lines.
    """
    if n <= 0:
        return []
    from metal_guard.settings import get_settings

    target = Path(path) if path is not None else get_settings().resolved_breadcrumb_path
    lines: deque[str] = deque(maxlen=n)
    for candidate in (target.with_name(target.name + ".1"), target):
        try:
            with candidate.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - max_bytes))
                if size > max_bytes:
                    fh.readline()
                chunk = fh.read()
        except (FileNotFoundError, IsADirectoryError):
            continue
        except OSError as exc:
            log.debug("cannot read breadcrumbs from %s: %s", candidate, exc)
            continue
        for raw in chunk.decode("utf-8", "replace").splitlines():
            lines.append(raw)
    return list(lines)


def tail(n: int = 20, *, path: Path | None = None) -> list[Breadcrumb]:
    """The last ``n`` parseable breadcrumbs, oldest first."""
    parsed = [b for b in (parse_line(line) for line in read_lines(n, path=path)) if b is not None]
    return parsed[-n:]
