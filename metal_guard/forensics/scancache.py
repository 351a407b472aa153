"""A small cache of parsed reports, so repeated gate runs do not re-read unchanged files.

``<cache>/report-scan-cache.json`` maps a report's path to its file fingerprint (device,
inode, size, mtime and ctime in ns) and the parsed :class:`PanicRecord` (or ``null`` for junk).
A file whose fingerprint changed is parsed again (rewriting a file moves its ctime, which no
unprivileged user can set back); entries for files no longer seen are dropped when the cache
is saved. The cache is disposable and treated as hostile input: a missing, oversize, linked,
corrupt or deeply nested file, another metal-guard version, or an entry whose fields have the
wrong types just means those files are parsed again, and the file is rewritten. It holds no
verdicts, only parse results, so it can never hide a report: a new report is a new path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from metal_guard._version import __version__
from metal_guard.forensics.records import PanicRecord

log = logging.getLogger("metal_guard.forensics.scancache")

CACHE_FILE = "report-scan-cache.json"
#: Bump when parsing or classification changes what a record holds.
FORMAT = f"2:{__version__}"
MAX_ENTRIES = 5000
#: A cache file larger than this is not read (it is rebuilt): 5000 entries need ~20 MB.
MAX_CACHE_BYTES = 32 << 20
_FIELDS = frozenset(f.name for f in dataclasses.fields(PanicRecord))
_STR_FIELDS = ("path", "kind", "explanation", "report_id", "timestamp_source", "excerpt")
_OPT_STR_FIELDS = ("signature", "error_class", "process")


def fingerprint(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def record_from_cache(raw: object, path: str) -> PanicRecord | None:
    """A :class:`PanicRecord` from a cache entry, or ``None`` unless every field has its type."""
    if not isinstance(raw, dict) or set(raw) - _FIELDS or raw.get("path") != path:
        return None
    ts = raw.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        return None
    if not all(isinstance(raw.get(k, ""), str) for k in _STR_FIELDS):
        return None
    if not all(raw.get(k) is None or isinstance(raw.get(k), str) for k in _OPT_STR_FIELDS):
        return None
    pid = raw.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        return None
    if not isinstance(raw.get("is_gpu", False), bool) or not isinstance(raw.get("extra", {}), dict):
        return None
    try:
        return PanicRecord(**{**raw, "timestamp": float(ts)})
    except (TypeError, ValueError):
        return None


class ScanCache:
    """Load with :meth:`load`, query with :meth:`get`, record with :meth:`put`, :meth:`save`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        self.dirty = False

    @classmethod
    def load(cls, path: Path | None) -> ScanCache:
        cache = cls(path)
        if path is None:
            return cache
        from metal_guard import storage

        try:  # capped, never through a symlink; deep nesting is a ValueError: rebuilt
            got = storage.read_bytes_capped(Path(path), MAX_CACHE_BYTES, tail=False)
            if got is None:
                return cache
            data = storage.loads_bounded(got[0])
        except (OSError, ValueError, RecursionError, MemoryError, storage.NotAStateFile) as exc:
            # Hostile nesting, junk, a link or an oversize file: the cache is rewritten on save.
            log.debug("ignoring report scan cache %s: %s: %s", path, type(exc).__name__, exc)
            cache.dirty = True
            return cache
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict):
            cache.entries = {k: v for k, v in data["entries"].items()
                             if isinstance(k, str) and isinstance(v, dict)}
        else:
            cache.dirty = True
        return cache

    def get(self, path: str, fp: str) -> tuple[bool, PanicRecord | None]:
        """``(hit, record)``; a hit with ``None`` means "known junk"."""
        self.seen.add(path)
        entry = self.entries.get(path)
        if entry is None or entry.get("fp") != fp or not isinstance(fp, str):
            return False, None
        raw = entry.get("record")
        if raw is None:
            return True, None
        record = record_from_cache(raw, path)
        return (record is not None), record

    def put(self, path: str, fp: str, record: PanicRecord | None) -> None:
        self.seen.add(path)
        self.entries[path] = {"fp": fp, "record": None if record is None else dataclasses.asdict(record)}
        self.dirty = True

    def save(self) -> None:
        """Write the cache if it changed (entries not seen in this scan are dropped)."""
        if self.path is None:
            return
        stale = set(self.entries) - self.seen
        if not self.dirty and not stale:
            return
        keep = {k: v for k, v in self.entries.items() if k in self.seen}
        if len(keep) > MAX_ENTRIES:
            keep = dict(list(keep.items())[-MAX_ENTRIES:])
        try:
            from metal_guard import storage

            storage.write_text_atomic(self.path, json.dumps({"format": FORMAT, "entries": keep},
                                                            default=str))
        except (OSError, ValueError) as exc:
            log.debug("could not save report scan cache %s: %s", self.path, exc)
