"""A small cache of parsed reports, so repeated gate runs do not re-read unchanged files.

``<cache>/report-scan-cache.json`` maps a report's path to its file fingerprint (device,
inode, size, mtime in ns) and the parsed :class:`PanicRecord` (or ``null`` for junk). A file
whose fingerprint changed is parsed again; entries for files no longer seen are dropped when
the cache is saved. The cache is disposable: a missing, corrupt or foreign file (or another
metal-guard version) just means everything is parsed. It holds no verdicts, only parse
results, so it can never hide a report: a new report is a new path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from metal_guard._version import __version__
from metal_guard.forensics.records import PanicRecord

log = logging.getLogger("metal_guard.forensics.scancache")

CACHE_FILE = "report-scan-cache.json"
#: Bump when parsing or classification changes what a record holds.
FORMAT = f"1:{__version__}"
MAX_ENTRIES = 5000
#: A larger cache file is ignored (and rebuilt) rather than read.
MAX_CACHE_BYTES = 32 << 20
_FIELDS = frozenset(f.name for f in dataclasses.fields(PanicRecord))


def fingerprint(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


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
        except (OSError, ValueError, storage.NotAStateFile) as exc:
            log.debug("ignoring report scan cache %s: %s", path, exc)
            return cache
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict):
            cache.entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
        return cache

    def get(self, path: str, fp: str) -> tuple[bool, PanicRecord | None]:
        """``(hit, record)``; a hit with ``None`` means "known junk"."""
        self.seen.add(path)
        entry = self.entries.get(path)
        if entry is None or entry.get("fp") != fp:
            return False, None
        raw = entry.get("record")
        if raw is None:
            return True, None
        if not isinstance(raw, dict) or set(raw) - _FIELDS:
            return False, None
        try:
            return True, PanicRecord(**raw)
        except (TypeError, ValueError):
            return False, None

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
        except OSError as exc:
            log.debug("could not save report scan cache %s: %s", self.path, exc)
